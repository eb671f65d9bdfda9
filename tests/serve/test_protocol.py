"""ROCK's answers, decided without a server."""

from __future__ import annotations

from corral.model import Alert, Category, Severity
from corral.serve import protocol as p


def action(check: str = "raise") -> p.BashAction:
    return p.BashAction(sandbox_id="s", command="kill -0 42", check=check)  # type: ignore[arg-type]


def test_check_raise_turns_a_non_zero_exit_into_a_failed_answer() -> None:
    # The SDK's nohup polling takes this Failed answer to mean "the job has ended".
    got = p.observation(action(), 1, "no such process\n", "", False, 30)
    assert got["status"] == "Failed" and got["result"] is None
    assert "exit code 1" in got["error"] and "no such process" in got["error"]
    ok = p.observation(action(), 0, "", "", False, 30)
    assert ok["status"] == "Success" and ok["result"]["exit_code"] == 0


def test_check_ignore_gives_no_exit_code_and_silent_gives_it_without_failing() -> None:
    ignored = p.observation(action("ignore"), 2, "x", "", False, 30)
    assert ignored["status"] == "Success" and ignored["result"]["exit_code"] is None
    silent = p.observation(action("silent"), 2, "x", "", False, 30)
    assert silent["status"] == "Success" and silent["result"]["exit_code"] == 2


def test_a_timeout_is_a_failed_answer_whatever_the_check() -> None:
    got = p.observation(action("silent"), 124, "", "", True, 2.5)
    assert got["status"] == "Failed" and "within 2.5 s" in got["error"]


def test_failure_reason_names_alerts_denials_and_the_end_of_the_episode() -> None:
    alerts = [
        Alert(f"d{i}", Category.MINING, Severity.HIGH, response="killed process") for i in range(7)
    ]
    text = p.failure_reason(alerts, "corral: deny: no", "a miner", None)
    lines = text.splitlines()
    assert lines[0].startswith("corral: 7 alerts")
    assert lines[1:6] == [f"corral alert: mining/d{i} (killed process)" for i in range(2, 7)]
    assert lines[6] == "corral: deny: no" and lines[7] == "corral: the episode was ended: a miner"
    assert p.failure_reason([], None, None, None) == ""


def test_requests_accept_fields_corral_does_not_use() -> None:
    # ROCK's SDK sends registry credentials, kata flags and more on start.
    req = p.StartRequest.model_validate(
        {"image": "swe", "use_kata_runtime": True, "registry_password": "x", "cpus": 1}
    )
    assert req.image == "swe" and req.cpus == 1


def test_sizes_are_written_as_rock_writes_them() -> None:
    assert p.size_text(8 << 30) == "8g" and p.size_text(512 << 20) == "512m"
