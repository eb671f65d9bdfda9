"""A sandbox keeps one shell: state carries over between commands, like a ROCK session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.ledger import Ledger
from corral.sandbox import Sandbox

from .test_sandbox import OPEN_GATE


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    with Ledger.memory() as ledger, Sandbox(OPEN_GATE, tmp_path, gate=False, ledger=ledger) as sb:
        yield sb


def test_directory_and_exported_variables_persist(sandbox: Sandbox) -> None:
    assert sandbox.run("mkdir -p sub && cd sub && export X=1").exit_code == 0
    r = sandbox.run("pwd; echo $X")
    assert r.stdout == f"{sandbox.workspace}/sub\n1\n"


def test_warm_commands_reuse_the_same_shell(sandbox: Sandbox) -> None:
    first = sandbox.run("echo $$").stdout
    second = sandbox.run("echo $$").stdout
    assert first == second != ""


def test_background_jobs_survive_between_calls(sandbox: Sandbox) -> None:
    assert sandbox.run("sleep 100 & echo started").stdout == "started\n"
    assert "sleep 100" in sandbox.run("jobs").stdout


def test_exit_ends_the_shell_and_the_next_command_gets_a_fresh_one(sandbox: Sandbox) -> None:
    sandbox.run("export KEPT=yes; echo note > note.txt")
    r = sandbox.run("echo bye; echo why >&2; exit 7")
    assert (r.exit_code, r.stdout, r.stderr) == (7, "bye\n", "why\n")
    r = sandbox.run("echo ${KEPT:-gone}; cat note.txt")
    assert r.stdout == "gone\nnote\n"  # shell state is lost, workspace files are not


def test_a_command_cannot_read_the_shells_input(sandbox: Sandbox) -> None:
    # Commands get /dev/null as stdin, so one cannot swallow the next hand-over line.
    r = sandbox.run("cat; echo done")
    assert r.stdout == "done\n"
    assert sandbox.run("echo next").stdout == "next\n"


def test_output_is_kept_apart_per_command(sandbox: Sandbox) -> None:
    sandbox.run("(sleep 0.3; echo late) &")
    assert sandbox.run("echo now").stdout == "now\n"


def test_huge_output_is_cut_not_loaded_whole(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    from corral.sandbox import session

    monkeypatch.setattr(session, "OUTPUT_LIMIT", 1000)
    r = sandbox.run("head -c 5000 /dev/zero | tr '\\0' x")
    assert r.stdout.startswith("x" * 1000) and "output cut at 1000 bytes" in r.stdout


def test_works_when_descriptors_are_numbered_past_1024(tmp_path: Path) -> None:
    # A host with hundreds of open sandboxes: every new descriptor is past select()'s limit.
    from corral.sandbox.bwrap import _raise_fd_limit

    _raise_fd_limit()
    null = os.open(os.devnull, os.O_RDONLY)
    held = [os.dup(null) for _ in range(1100)]
    try:
        with (
            Ledger.memory() as ledger,
            Sandbox(OPEN_GATE, tmp_path, gate=False, ledger=ledger) as sb,
        ):
            assert sb.run("echo high").stdout == "high\n"
    finally:
        for fd in [null, *held]:
            os.close(fd)


def test_a_sandbox_that_cannot_start_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from corral.errors import CorralError
    from corral.sandbox.launch import Launched, launch
    from corral.sandbox.session import ShellSession

    monkeypatch.setenv("CORRAL_HOME", str(tmp_path / "home"))

    def broken(command: list[str], io_dir: Path, **popen: Any) -> Launched:
        return launch(
            lambda info, block: ["bwrap", "--no-such-option", "--", *command],
            lambda pid, launched: None,
            **popen,
        )

    with pytest.raises(CorralError, match="no-such-option"):
        ShellSession(broken)
    assert list((tmp_path / "home" / "run").iterdir()) == []  # nothing left behind


def test_named_sessions_keep_their_own_shell_state(sandbox: Sandbox) -> None:
    sandbox.open_session("a", {"WHO": "session a"})
    sandbox.open_session("b")
    sandbox.run("mkdir -p da && cd da; sleep 100 &", session="a")
    assert sandbox.run("pwd; echo $WHO; jobs | wc -l", session="a").stdout == (
        f"{sandbox.workspace}/da\nsession a\n1\n"
    )
    assert sandbox.run("pwd; echo ${WHO:-unset}; jobs | wc -l", session="b").stdout == (
        f"{sandbox.workspace}\nunset\n0\n"
    )
    # The workspace is shared; each session's /tmp and processes are its own.
    sandbox.run("echo from-b > shared.txt", session="b")
    assert sandbox.run("cat ../shared.txt", session="a").stdout == "from-b\n"
    with pytest.raises(Exception, match="already exists"):
        sandbox.open_session("a")
    sandbox.close_session("a")
    with pytest.raises(Exception, match="no session 'a'"):
        sandbox.run("true", session="a")


def test_past_the_limit_the_least_recently_used_idle_session_makes_room(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    from corral.sandbox import bwrap

    monkeypatch.setattr(bwrap, "MAX_SESSIONS", 3)
    sandbox.run("true")  # the default session: never evicted
    sandbox.open_session("busy")
    sandbox.run("sleep 100 &", session="busy")
    sandbox.open_session("idle")
    sandbox.open_session("new")  # "idle" goes, "busy" has a job running
    names = sandbox.backend._boxes[sandbox.id].sessions  # type: ignore[attr-defined]
    assert sorted(names) == ["busy", "default", "new"]
    sandbox.run("sleep 100 &", session="new")
    with pytest.raises(Exception, match="each running something in the background"):
        sandbox.open_session("one-too-many")
