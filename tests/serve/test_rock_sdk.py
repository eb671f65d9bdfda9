"""ROCK's own SDK (``rl-rock`` from PyPI, pinned, unmodified) driving ``corral serve``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from rock.actions import (
    Command,
    CreateBashSessionRequest,
    ReadFileRequest,
    UploadRequest,
    WriteFileRequest,
)
from rock.sdk.sandbox.client import RunMode, Sandbox
from rock.sdk.sandbox.config import SandboxConfig

from tests.procs import running
from tests.serve.conftest import ALICE, BOB, Served

# The SDK reads its own deprecated config field on every request.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def sdk(url: str, token: str = ALICE, **config: Any) -> Sandbox:
    return Sandbox(
        SandboxConfig(
            base_url=url,
            extra_headers={"XRL-Authorization": f"Bearer {token}"},
            startup_timeout=30,
            **config,
        )
    )


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro())  # type: ignore[arg-type]


def test_the_sdk_starts_runs_moves_files_and_stops(served: Served, tmp_path: Path) -> None:
    async def rollout() -> None:
        sb = sdk(served.url, user_id="u-17", experiment_id="exp-3", namespace="team-a")
        await sb.start()
        assert sb.sandbox_id and sb.host_ip

        r = await sb.arun("echo hello; echo oops >&2")
        assert r.exit_code == 0 and r.output == "hello\noops\n"

        # A named session keeps its shell: directory, variables and background jobs.
        await sb.create_session(CreateBashSessionRequest(session="s", env={"GREETING": "hi"}))
        await sb.arun("mkdir -p work && cd work && sleep 30 & echo started", session="s")
        r = await sb.arun("echo $GREETING; jobs | wc -l", session="s")
        assert r.output == "hi\n1\n"

        # nohup mode: start, poll `kill -0` until the job is gone, read its output.
        r = await sb.arun(
            "python3 -c 'import time; time.sleep(1); print(6 * 7)'",
            mode=RunMode.NOHUP,
            wait_timeout=60,
            wait_interval=5,
        )
        assert r.exit_code == 0 and r.output == "42\n", r

        argv = await sb.execute(Command(command=["printf", "%s|", "a b", "$HOME"]))
        assert argv.stdout == "a b|$HOME|" and argv.exit_code == 0
        shell = await sb.execute(Command(command="echo $((6 * 7))", cwd="work"))
        assert shell.stdout == "42\n"

        w = await sb.write_file(WriteFileRequest(content="x = 1\n", path="pkg/a.py"))
        assert w.success
        assert (await sb.read_file(ReadFileRequest(path="pkg/a.py"))).content == "x = 1\n"
        # Files are served from the workspace only, whatever the path says.
        out = await sb.write_file(WriteFileRequest(content="* * * * * x\n", path="/etc/cron.d/x"))
        assert not out.success and "outside the workspace" in out.message
        src = tmp_path / "data.bin"
        src.write_bytes(b"\x00\x01payload")
        up = await sb.upload(UploadRequest(source_path=str(src), target_path="in/data.bin"))
        assert up.success, up
        r = await sb.arun("od -An -c in/data.bin | tr -d ' '", session="s")
        assert "payload" in r.output

        # check="raise" (the default): a failing command is a Failed answer.
        with pytest.raises(Exception, match="exit code 3"):
            await sb.arun("exit 3", session="s")

        status = await sb.get_status()
        assert status.is_alive and status.user_id == "u-17"
        await sb.stop()
        status = await sb.get_status()
        assert not status.is_alive and status.state == "stopped"

    run(rollout)
    labelled = [r.body["labels"] for r in served.ledger.records() if "labels" in r.body]
    assert labelled and all(
        lab["user_id"] == "u-17" and lab["experiment_id"] == "exp-3" and lab["owner"] == "alice"
        for lab in labelled
    )
    kinds = {r.kind for r in served.ledger.records() if "labels" in r.body}
    assert {"decision", "exec", "note"} <= kinds


MINER = """
import hashlib
# "warming a cache": really a hashing loop, left running after its command returned
n = 0
while True:
    n += 1
    hashlib.sha256(n.to_bytes(8, "little")).digest()
"""


def test_a_miner_started_through_the_sdk_is_killed_and_the_rollout_sees_the_alert(
    served: Served,
) -> None:
    async def rollout() -> None:
        sb = sdk(served.url)
        await sb.start()
        await sb.write_file(WriteFileRequest(content=MINER, path="warm_cache.py"))
        r = await sb.arun(
            "python3 warm_cache.py", mode=RunMode.NOHUP, wait_timeout=120, wait_interval=5
        )
        # The SDK saw its background job end: the watcher killed it.
        assert "did not complete" not in r.output, r
        assert running("warm_cache.py") == []
        r = await sb.arun("echo next step")
        assert r.output == "next step\n"
        assert "corral alert: mining/resource-hijack-cpu" in r.failure_reason, r

        async with httpx.AsyncClient() as client:
            got = await client.get(
                f"{served.url}/apis/envs/sandbox/v1/alerts",
                params={"sandbox_id": sb.sandbox_id},
                headers={"XRL-Authorization": f"Bearer {ALICE}"},
            )
        body = got.json()
        assert body["status"] == "Success"
        (alert,) = [a for a in body["result"]["alerts"] if a["category"] == "mining"]
        assert alert["detector"] == "resource-hijack-cpu" and alert["action_id"]
        await sb.stop()

    run(rollout)
    started = [
        r for r in served.ledger.records(kinds="exec") if "warm_cache.py" in json.dumps(r.body)
    ]
    alerts = [r for r in served.ledger.records(kinds="alert") if r.body["category"] == "mining"]
    assert alerts and alerts[0].action_id == started[0].action_id


def test_requests_without_a_valid_token_are_refused(served: Served) -> None:
    base = f"{served.url}/apis/envs/sandbox/v1"
    body = {"image": "python:3.11"}
    for headers in ({}, {"XRL-Authorization": "Bearer wrong-token-0123456789"}):
        r = httpx.post(f"{base}/start_async", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["status"] == "Failed"
    assert served.host.sandboxes() == []
    for headers in (
        {"Authorization": f"Bearer {ALICE}"},
        {"X-API-Key": ALICE},
        {"XRL-Authorization": f"Bearer {ALICE}"},
    ):
        r = httpx.post(f"{base}/start_async", json=body, headers=headers)
        assert r.status_code == 200 and r.json()["status"] == "Success", r.text


def test_one_users_token_cannot_touch_another_users_sandbox(served: Served) -> None:
    async def rollout() -> None:
        alice = sdk(served.url, ALICE)
        await alice.start()
        await alice.arun("echo mine > secret.txt")
        mallory = sdk(served.url, BOB)
        with pytest.raises(Exception, match="no sandbox"):
            await mallory.attach(alice.sandbox_id)
        mallory._sandbox_id = alice.sandbox_id  # pretend to know it anyway
        with pytest.raises(Exception, match="no sandbox"):
            await mallory.arun("cat secret.txt", session="default")
        async with httpx.AsyncClient() as client:
            got = await client.post(
                f"{served.url}/apis/envs/sandbox/v1/read_file",
                json={"sandbox_id": alice.sandbox_id, "path": "secret.txt"},
                headers={"X-API-Key": BOB},
            )
        assert got.json()["status"] == "Failed" and "no sandbox" in got.json()["error"]
        await mallory.stop()  # the SDK swallows the refusal
        assert (await alice.get_status()).is_alive
        r = await alice.arun("cat secret.txt")
        assert r.output == "mine\n"
        await alice.stop()

    run(rollout)


def test_an_unknown_image_is_refused_with_the_known_profiles(served: Served) -> None:
    async def rollout() -> None:
        sb = sdk(served.url, image="ubuntu:22.04")
        with pytest.raises(Exception, match=r"no profile 'ubuntu:22.04'.*python:3\.11"):
            await sb.start()

    run(rollout)
    assert served.host.sandboxes() == []


def test_a_client_chosen_id_is_honoured_once(served: Served) -> None:
    async def rollout() -> None:
        sb = sdk(served.url, sandbox_id="rollout-0007")
        await sb.start()
        assert sb.sandbox_id == "rollout-0007"
        with pytest.raises(Exception, match="already exists"):
            await sdk(served.url, sandbox_id="rollout-0007").start()
        with pytest.raises(Exception, match="not allowed"):
            await sdk(served.url, sandbox_id="../etc").start()
        await sb.stop()

    run(rollout)
