"""Pool benchmark: sandboxes through ``corral.ray.SandboxPool`` against the local host.

    python bench/pool_bench.py [-n 1000] [--concurrency 64] [--nodes 2]

Prints, measured in one run on this machine:
- ``-n`` sandboxes created and their first command run (``echo ok``), ``--concurrency``
  at a time, through the pool on a local Ray cluster of ``--nodes`` logical nodes
  (asyncio: ``astart`` then ``arun``), against the same through ``Host`` directly in
  this process (threads: ``start`` then ``run``): wall time, rate, and the ratio;
- the round trip of ROCK's SDK ``arun`` (an open session, ``echo ok``) through
  ``corral serve --ray`` (``corral.ray.serving``: the driver routes it to the sandbox's
  host) against ``corral serve`` on one local host; median of ``--round-trips``;
- memory per idle sandbox (its shell started, nothing running): the proportional set
  size (PSS, shared pages split between their users) of the host processes (the pool's
  host actors; for the local host, this process) plus every process in the sandboxes'
  cgroups, with all ``-n`` sandboxes up, less the hosts' with none, over ``-n``.

The Ray cluster's own start-up is not counted. Each side uses the same profile, gate and
auditor.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on loopback

COMMAND = "echo ok"
PROFILE = "python:3.11"
SMALL = {"cpus": 0.05, "memory": 256 << 20}


def _pss_of(pids: Iterable[int]) -> int:
    """Bytes of proportional set size (shared pages split between their users)."""
    total = 0
    for pid in set(pids):
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass  # gone since
    return total


def _sandbox_pids(ids: set[str]) -> list[int]:
    """Every process in these sandboxes' cgroups (bubblewrap, its init, the shell)."""
    pids: list[int] = []
    for root, dirs, _ in os.walk("/sys/fs/cgroup/pids"):
        for d in dirs:
            if d.startswith("corral-") and d[len("corral-") :] in ids:
                with contextlib.suppress(OSError):
                    procs = Path(root, d, "cgroup.procs").read_text().split()
                    pids += [int(x) for x in procs]
        dirs[:] = [d for d in dirs if not d.startswith("corral-")]
    if not pids:
        for root, dirs, _ in os.walk("/sys/fs/cgroup"):  # v2: one hierarchy
            for d in dirs:
                if d.startswith("corral-") and d[len("corral-") :] in ids:
                    with contextlib.suppress(OSError):
                        procs = Path(root, d, "cgroup.procs").read_text().split()
                        pids += [int(x) for x in procs]
    return pids


def _footprint(hosts: list[int], ids: set[str]) -> int:
    """The hosts' own memory and their sandboxes' processes'."""
    return _pss_of(hosts) + _pss_of(_sandbox_pids(ids))


def sdk_round_trip(url: str, n: int) -> float:
    """Median seconds of ROCK's SDK ``arun`` in an open session, against ``url``."""
    import statistics
    import warnings

    from rock.actions import CreateBashSessionRequest
    from rock.sdk.sandbox.client import Sandbox as RockSandbox
    from rock.sdk.sandbox.config import SandboxConfig

    warnings.simplefilter("ignore", DeprecationWarning)  # the SDK's own

    async def trips() -> float:
        sb = RockSandbox(SandboxConfig(base_url=url, image=PROFILE, startup_timeout=60))
        await sb.start()
        await sb.create_session(CreateBashSessionRequest(session="bench"))
        times = []
        for _ in range(n + 5):
            t0 = time.perf_counter()
            r = await sb.arun(COMMAND, session="bench")
            times.append(time.perf_counter() - t0)
            assert r.output == "ok\n", r
        await sb.stop()
        return statistics.median(times[5:])  # the first few warm the connection

    return asyncio.run(trips())


def local(n: int, concurrency: int, tmp: Path, trips: int) -> tuple[float, float, float]:
    from corral.host import Host
    from corral.ledger import Ledger
    from corral.serve.server import serving

    with (
        Ledger.open(tmp / "local.db") as ledger,
        Host(ledger=ledger, root=tmp / "local", reap_every=0) as host,
    ):
        warm = host.start(PROFILE, **SMALL)  # type: ignore[arg-type]
        warm.sandbox.run(COMMAND)
        host.delete(warm.id)
        base = _footprint([os.getpid()], set())

        def one(_: int) -> str:
            h = host.start(PROFILE, **SMALL)  # type: ignore[arg-type]
            assert h.sandbox.run(COMMAND).stdout == "ok\n"
            return h.id

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(concurrency) as ex:
            ids = list(ex.map(one, range(n)))
        wall = time.perf_counter() - t0
        inner = {host.get(i).sandbox.id for i in ids}
        per = (_footprint([os.getpid()], inner) - base) / n
        with concurrent.futures.ThreadPoolExecutor(concurrency) as ex:
            list(ex.map(host.delete, ids))
        with serving(host) as url:
            rt = sdk_round_trip(url, trips)
    return wall, per, rt


def pool(n: int, concurrency: int, nodes: int, tmp: Path, trips: int) -> tuple[float, float, float]:
    import ray
    from ray.cluster_utils import Cluster

    from corral.ray import SandboxPool
    from corral.ray.serving import serving_pool

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(nodes):
        c.add_node(num_cpus=256, memory=256 << 30, object_store_memory=200 << 20)
    ray.init(address=c.address, log_to_driver=False, include_dashboard=False)
    c.wait_for_nodes()
    try:
        with SandboxPool(name="bench", state_dir=tmp / "pool", max_concurrency=128) as p:
            pids = [ray.get(p.actor(h["name"]).info.remote())["pid"] for h in p.hosts()]

            async def warm() -> None:
                sbs = [await p.astart(PROFILE, **SMALL) for _ in range(nodes * 2)]  # type: ignore[arg-type]
                for sb in sbs:
                    await sb.arun(COMMAND)
                    await sb.aclose()

            asyncio.run(warm())
            base = _footprint(pids, set())
            gate = asyncio.Semaphore(concurrency)

            async def one() -> object:
                async with gate:
                    sb = await p.astart(PROFILE, **SMALL)  # type: ignore[arg-type]
                    r = await sb.arun(COMMAND)
                    assert r.stdout == "ok\n", r
                    return sb

            async def all_of_them() -> list[object]:
                nonlocal gate
                gate = asyncio.Semaphore(concurrency)
                return list(await asyncio.gather(*(one() for _ in range(n))))

            t0 = time.perf_counter()
            sbs = asyncio.run(all_of_them())
            wall = time.perf_counter() - t0
            inner = {sb.sandbox_id for sb in sbs}  # type: ignore[attr-defined]
            per = (_footprint(pids, inner) - base) / n

            async def close_all() -> None:
                await asyncio.gather(*(sb.aclose() for sb in sbs))  # type: ignore[attr-defined]

            asyncio.run(close_all())
            with serving_pool(p) as url:
                rt = sdk_round_trip(url, trips)
    finally:
        ray.shutdown()
        c.shutdown()
    return wall, per, rt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=1000, help="sandboxes per side")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--nodes", type=int, default=2, help="logical Ray nodes")
    ap.add_argument("--round-trips", type=int, default=200, help="SDK round trips per side")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        lw, lmem, lrt = local(args.n, args.concurrency, Path(tmp), args.round_trips)
        pw, pmem, prt = pool(args.n, args.concurrency, args.nodes, Path(tmp), args.round_trips)
    print(
        f"pool bench: {args.n} sandboxes, first command '{COMMAND}', {args.concurrency} at a time"
    )
    print(f"  local host : {lw:7.2f} s  {args.n / lw:7.1f} sandboxes/s")
    print(f"  Ray pool   : {pw:7.2f} s  {args.n / pw:7.1f} sandboxes/s  ({args.nodes} nodes)")
    print(f"  ratio pool/local wall time: {pw / lw:.2f}x  (rate {lw / pw:.2f}x of local)")
    print(
        f"  ROCK SDK arun round trip, median of {args.round_trips}: corral serve --ray"
        f" {prt * 1e3:.2f} ms, corral serve {lrt * 1e3:.2f} ms, ratio {prt / lrt:.2f}x"
    )
    print(
        f"  memory per idle sandbox (PSS): pool {pmem / 2**20:.2f} MiB, local {lmem / 2**20:.2f} MiB"
    )


if __name__ == "__main__":
    main()
