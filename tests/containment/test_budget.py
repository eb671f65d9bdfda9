"""Episode budgets as data: when the CPU budget is spent, and which byte budget the proxy gets."""

from __future__ import annotations

from corral.egress.decide import BYTES_KEY
from corral.sandbox.budget import EpisodeBudget, with_egress_budget


def test_the_cpu_budget_is_spent_at_its_figure_and_not_before() -> None:
    budget = EpisodeBudget(cpu_seconds=10)
    assert budget.spent({"cpu_s": 9.99}) is None
    why = budget.spent({"cpu_s": 10.0})
    assert why is not None and "10.0 s of 10 s" in why and "resources.episode.cpu_seconds" in why


def test_no_budget_or_no_cgroup_spends_nothing() -> None:
    assert EpisodeBudget().spent({"cpu_s": 1e9}) is None
    budget = EpisodeBudget(cpu_seconds=1)
    assert budget.spent(None) is None  # no cgroup to measure
    assert budget.spent({"cpu_s": None}) is None


def test_the_proxy_enforces_the_smaller_byte_budget_and_names_it() -> None:
    net = {"mode": "proxy", "max_bytes": 1000}
    assert with_egress_budget(net, None) == net
    lowered = with_egress_budget(net, 10)
    assert lowered["max_bytes"] == 10
    assert lowered[BYTES_KEY] == "resources.episode.egress_bytes"
    assert with_egress_budget(net, 5000) == net  # the network's own is smaller
    assert with_egress_budget({"mode": "proxy", "max_bytes": None}, 0)["max_bytes"] == 0
    assert net == {"mode": "proxy", "max_bytes": 1000}  # the caller's is not changed
