"""``corral serve --ray``: ROCK's own SDK driving sandboxes spread over a Ray pool."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from rock.actions import ReadFileRequest, WriteFileRequest
from rock.sdk.sandbox.client import Sandbox
from rock.sdk.sandbox.config import SandboxConfig

from corral.ledger import MergedLedger
from corral.ray import SandboxPool
from corral.ray.serving import serving_pool
from corral.serve.auth import Tokens
from tests.procs import running, wait_for
from tests.serve.conftest import ALICE, BOB

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
API = "/apis/envs/sandbox/v1"


def sdk(url: str, token: str = ALICE) -> Sandbox:
    return Sandbox(
        SandboxConfig(
            base_url=url,
            extra_headers={"XRL-Authorization": f"Bearer {token}"},
            startup_timeout=60,
        )
    )


def call(url: str, route: str, token: str, **params: Any) -> dict[str, Any]:
    got = httpx.get(
        f"{url}{API}/{route}", params=params, headers={"XRL-Authorization": f"Bearer {token}"}
    )
    body: dict[str, Any] = got.json()
    return body


def test_the_rock_sdk_runs_rollouts_across_the_pool(pool: SandboxPool) -> None:
    tokens = Tokens({ALICE: "alice", BOB: "bob"})

    async def rollouts(url: str) -> list[str]:
        boxes = [sdk(url) for _ in range(4)]
        await asyncio.gather(*(sb.start() for sb in boxes))

        async def step(i: int, sb: Sandbox) -> None:
            r = await sb.arun(f"echo step-{i} > out.txt && cat out.txt")
            assert r.exit_code == 0 and r.output == f"step-{i}\n"
            w = await sb.write_file(WriteFileRequest(content=f"x = {i}\n", path="a.py"))
            assert w.success
            got = await sb.read_file(ReadFileRequest(path="a.py"))
            assert got.content == f"x = {i}\n"

        await asyncio.gather(*(step(i, sb) for i, sb in enumerate(boxes)))
        # A tunnel, refused by the gate on whichever node the sandbox landed.
        with pytest.raises(Exception, match=r"(?i)tunnel") as refused:
            await boxes[0].arun("ssh -N -R 9999:127.0.0.1:22 u@example.com")
        assert "deny" in str(refused.value), refused.value
        ids = [sb.sandbox_id for sb in boxes]
        for sb in boxes:
            await sb.stop()
        return [i for i in ids if i]

    with serving_pool(pool, tokens) as url:
        ids = asyncio.run(rollouts(url))
        assert len(ids) == 4
        # Placed by room: four sandboxes over two hosts, both used.
        hosts = {s.host for s in pool.sandboxes}
        assert hosts == {"host-0", "host-1"}, pool.sandboxes
        # Stopped sandboxes hold nothing of their node, though they still answer.
        assert wait_for(lambda: all(h["reserved_cpus"] == 0 for h in pool.hosts()))
        assert len(pool.sandboxes) == 4
        # Each host checks the owner: bob is told alice's sandbox does not exist.
        mine = call(url, "get_status", ALICE, sandbox_id=ids[0])
        assert mine["status"] == "Success" and mine["result"]["state"] == "stopped"
        theirs = call(url, "get_status", BOB, sandbox_id=ids[0])
        assert theirs["status"] == "Failed" and "no sandbox" in theirs["error"]
        for i in ids:
            r = httpx.post(
                f"{url}{API}/delete",
                json={"sandbox_id": i},
                headers={"XRL-Authorization": f"Bearer {ALICE}"},
            )
            assert r.json()["status"] == "Success"
        assert pool.sandboxes == []  # every place given back
        metrics = httpx.get(f"{url}/metrics", headers={"XRL-Authorization": f"Bearer {ALICE}"})
        assert 'host="host-0"' in metrics.text and 'host="host-1"' in metrics.text
    with MergedLedger([pool.state_dir]) as merged:
        assert all(v.ok for v in merged.verify().values()), merged.verify()
        created = {
            hr.record.body.get("sandbox_id")
            for hr in merged.records()
            if hr.record.body.get("event") == "sandbox created"
        }
        assert len(created) == 4


def test_a_miner_through_the_pool_is_killed_on_its_node(pool: SandboxPool) -> None:
    async def rollout(url: str) -> tuple[str, str]:
        sb = sdk(url)
        await sb.start()
        await sb.arun("nohup python3 -c 'while True: pass' > /dev/null 2>&1 &")
        assert wait_for(lambda: running("while True: pass"))
        assert wait_for(lambda: not running("while True: pass"), timeout=15)
        r = await sb.arun("echo next")
        sid = sb.sandbox_id or ""
        return sid, r.failure_reason

    with serving_pool(pool, Tokens({ALICE: "alice"})) as url:
        sid, reason = asyncio.run(rollout(url))
        assert "resource-hijack-cpu" in reason
        body = call(url, "alerts", ALICE, sandbox_id=sid)["result"]
        assert [a["detector"] for a in body["alerts"]] == ["resource-hijack-cpu"]


def test_corral_serve_ray_says_what_it_needs(tmp_path: Path) -> None:
    env = {**os.environ, "CORRAL_HOME": str(tmp_path)}
    r = subprocess.run(
        [sys.executable, "-m", "corral", "serve", "--ray", "auto", "--port", "0"],
        capture_output=True,
        text=True,
        env={**env, "RAY_ADDRESS": ""},
        timeout=120,
    )
    # No token and no --local-only: refused before Ray is touched.
    assert r.returncode == 2 and "token" in r.stderr.lower(), r.stderr


def test_a_host_killed_under_a_rollout_fails_its_calls_and_the_pool_serves_on(
    pool: SandboxPool,
) -> None:
    import ray

    async def rollout(url: str) -> None:
        sb = sdk(url)
        await sb.start()
        assert (await sb.arun("echo up")).output == "up\n"
        (placed,) = [s for s in pool.sandboxes if s.id == sb.sandbox_id]
        ray.kill(pool.actor(placed.host))  # SIGKILL: the host runs no cleanup
        # The next call is a Failed answer naming the dead host, at once, not a hang.
        with pytest.raises(Exception, match=f"{placed.host} died"):
            await asyncio.wait_for(sb.arun("echo again"), timeout=60)
        # The pool put a new host on the node: a new rollout is served.
        assert wait_for(lambda: all(h["alive"] for h in pool.hosts()), timeout=60)
        again = sdk(url)
        await again.start()
        assert (await again.arun("echo served")).output == "served\n"
        await again.stop()

    with serving_pool(pool, Tokens({ALICE: "alice"})) as url:
        asyncio.run(rollout(url))
