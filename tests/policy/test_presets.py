"""The shipped presets: each loads, resolves, and keeps the promises its comment makes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import corral
import corral.policy
from corral import Policy
from corral.model import Verdict
from corral.policy import preset_names
from corral.policy.loader import PRESETS_DIR

PRESETS = ["rl-agent", "rl-rollout", "strict", "swe"]


def test_preset_names() -> None:
    assert preset_names() == PRESETS


def test_policy_is_exported() -> None:
    assert corral.Policy is Policy is corral.policy.Policy
    assert "Policy" in corral.__all__


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_and_resolves(name: str) -> None:
    policy = Policy.load(name)
    assert policy.name == name
    assert policy.spec.name == name
    assert policy.source == f"preset:{name}"
    assert policy.spec.version == 1
    assert policy.spec.extends is None
    assert policy.files[-1] == str(PRESETS_DIR / f"{name}.yaml")
    assert policy.spec.resources.gpus == 0


@pytest.mark.parametrize("name", PRESETS)
def test_preset_file_starts_with_intent_comment(name: str) -> None:
    text = (PRESETS_DIR / f"{name}.yaml").read_text()
    assert text.startswith(f"# {name}:")
    assert yaml.safe_load(text)["version"] == 1


@pytest.mark.parametrize("name", PRESETS)
def test_preset_by_path_equals_by_name(name: str) -> None:
    by_path = Policy.load(PRESETS_DIR / f"{name}.yaml")
    assert by_path.hash == Policy.load(name).hash
    assert by_path.source == f"preset:{name}"


@pytest.mark.parametrize("name", PRESETS)
def test_to_yaml_round_trips(name: str) -> None:
    policy = Policy.load(name)
    text = policy.to_yaml()
    assert policy.hash in text
    again = Policy.from_dict(yaml.safe_load(text))
    assert again.hash == policy.hash
    assert again.to_dict() == policy.to_dict()


@pytest.mark.parametrize("name", PRESETS)
def test_hash_stable(name: str) -> None:
    assert Policy.load(name).hash == Policy.load(name).hash


def test_presets_differ() -> None:
    hashes = {Policy.load(name).hash for name in PRESETS}
    assert len(hashes) == len(PRESETS)


def test_strict() -> None:
    spec = Policy.load("strict").spec
    assert spec.network.mode == "none"
    assert spec.network.allow == ()
    assert spec.commands.default is Verdict.DENY
    assert spec.commands.threats is True
    for program in ["ls", "cat", "grep", "find", "sed", "awk", "[", "true", "xargs", "tar"]:
        assert program in spec.commands.allow
    for program in ["curl", "wget", "python", "bash", "sh", "nc", "ssh", "sudo"]:
        assert program not in spec.commands.allow
    for path in [
        "~/.ssh",
        "~/.aws",
        "~/.config/gcloud",
        "~/.kube",
        "~/.docker",
        "~/.gnupg",
        "~/.netrc",
        "/root",
        "/etc/shadow",
        "/var/run/docker.sock",
        "/run/docker.sock",
        "/run/containerd",
        "/proc/kcore",
    ]:
        assert path in spec.filesystem.hidden
    assert {".git/hooks", ".git/config"} <= set(spec.filesystem.protected)
    assert "169.254.0.0/16" in spec.network.deny
    r = spec.resources
    assert (r.cpus, r.memory, r.pids, r.wall_time, r.gpus) == (2.0, 4 << 30, 512, 1800.0, 0)


def test_swe_extends_strict() -> None:
    strict = Policy.load("strict").spec
    swe = Policy.load("swe").spec
    # everything strict hides, denies or allows is still there
    assert set(strict.filesystem.hidden) <= set(swe.filesystem.hidden)
    assert set(strict.network.deny) <= set(swe.network.deny)
    assert set(strict.commands.allow) <= set(swe.commands.allow)
    assert swe.commands.default is Verdict.ASK
    for program in ["python*", "pip*", "pytest", "git", "make", "node", "npm", "cargo", "go"]:
        assert program in swe.commands.allow
    assert swe.network.mode == "proxy"
    for host in [
        "pypi.org:443",
        "files.pythonhosted.org:443",
        "registry.npmjs.org:443",
        "github.com:443",
        "*.githubusercontent.com:443",
    ]:
        assert host in swe.network.allow
    assert all(p.port is not None for p in swe.network.allow_patterns)
    rules = {r.id: r for r in swe.commands.rules}
    force = rules["no-force-push"].argv_pattern()
    assert force is not None and force.search("push --force origin main")
    assert rules["no-force-push"].decision is Verdict.DENY


def test_rl_rollout() -> None:
    spec = Policy.load("rl-rollout").spec
    assert spec.network.mode == "none"
    assert spec.commands.default is Verdict.DENY
    assert spec.audit.auditor == "rules"
    episode = spec.resources.episode
    assert episode.max_steps == 200
    assert episode.wall_time == 600.0
    assert episode.cpu_seconds == 600.0
    assert episode.egress_bytes == 0
    assert set(Policy.load("strict").spec.filesystem.hidden) <= set(spec.filesystem.hidden)


def test_user_policy_extending_preset(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("version: 1\nextends: swe\ncommands:\n  allow: [terraform]\n")
    policy = Policy.load(path)
    assert policy.name == "mine"
    assert "terraform" in policy.spec.commands.allow
    assert "git" in policy.spec.commands.allow
    assert policy.spec.network.mode == "proxy"


def test_rl_agent_allows_rock_job_control_and_keeps_rl_rollouts_promises() -> None:
    agent, rollout = Policy.load("rl-agent"), Policy.load("rl-rollout")
    # What ROCK's SDK runs for arun(mode="nohup"): start, poll, read.
    for command in (
        "nohup python3 job.py < /dev/null > /tmp/tmp_1.out 2>&1 & echo PIDSTART${!}PIDEND;disown",
        "kill -0 1234",
        "cat /tmp/tmp_1.out",
    ):
        assert agent.check(command).verdict is Verdict.ALLOW, command
    assert agent.check("ssh -R 9999:localhost:22 me@203.0.113.7").verdict is Verdict.DENY
    assert agent.spec.network.mode == "none"
    assert agent.spec.audit == rollout.spec.audit
    assert agent.spec.resources.episode == rollout.spec.resources.episode
