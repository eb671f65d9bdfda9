"""Placement is bookkeeping: which host has room, spreading the load."""

from __future__ import annotations

import pytest

from corral.ray.placement import Capacity, NoRoom, Request, choose

GiB = 1 << 30


def test_sandboxes_spread_over_the_hosts_with_most_room() -> None:
    hosts = {h.host: h for h in (Capacity("a", 8, 16 * GiB), Capacity("b", 8, 16 * GiB))}
    req = Request(1, GiB)
    placed = []
    for _ in range(6):
        name = choose(hosts.values(), req)
        hosts[name] = hosts[name].reserve(req)
        placed.append(name)
    assert sorted(placed) == ["a", "a", "a", "b", "b", "b"]
    # A bigger node gets more of them: room is judged by share, then by what is left.
    big = Capacity("big", 32, 64 * GiB, used_cpus=4, used_memory=4 * GiB)
    assert choose([hosts["a"], big], req) == "big"


def test_a_sandbox_goes_only_where_it_fits() -> None:
    small = Capacity("small", 2, 2 * GiB)
    gpu = Capacity("gpu", 2, 64 * GiB, gpus=1)
    assert choose([small, gpu], Request(1, 4 * GiB)) == "gpu"
    assert choose([small, gpu], Request(0.5, GiB, gpus=1)) == "gpu"
    with pytest.raises(NoRoom, match=r"no host has room for a sandbox of 1 CPU, 0\.50 GiB, 2 GPU"):
        choose([small, gpu], Request(1, GiB // 2, gpus=2))


def test_overcommit_packs_more_but_never_shares_a_gpu() -> None:
    h = Capacity("a", 2, 4 * GiB, gpus=1, used_cpus=2, used_memory=4 * GiB, used_gpus=1)
    with pytest.raises(NoRoom, match=r"a: 0 CPU, 0\.00 GiB, 0 GPU free"):
        choose([h], Request(1, GiB))
    assert choose([h], Request(1, GiB), overcommit=2.0) == "a"
    with pytest.raises(NoRoom):
        choose([h], Request(1, GiB, gpus=1), overcommit=2.0)


def test_dead_hosts_take_nothing_and_releasing_frees_room() -> None:
    dead = Capacity("a", 64, 64 * GiB, alive=False)
    with pytest.raises(NoRoom, match="no host is alive in the pool"):
        choose([dead], Request(1, GiB))
    live = Capacity("b", 1, GiB).reserve(Request(1, GiB))
    with pytest.raises(NoRoom):
        choose([dead, live], Request(1, GiB))
    assert choose([dead, live.release(Request(1, GiB))], Request(1, GiB)) == "b"
    # Releasing never goes below nothing (a double close is harmless).
    again = live.release(Request(1, GiB)).release(Request(1, GiB))
    assert (again.used_cpus, again.used_memory) == (0, 0)
