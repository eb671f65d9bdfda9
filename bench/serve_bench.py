"""Serve benchmark: what ROCK's protocol over HTTP costs, as ratios measured in one run.

    python bench/serve_bench.py [-n 200] [--clients 64] [--starts 256]

Prints
- the round trip of ROCK's SDK ``arun`` (normal mode, an open session) through
  ``corral serve`` on loopback, against a warm ``Sandbox.run`` of the same command
  through the Python API (same policy, gate and auditor on both sides): the price of
  HTTP, JSON and the SDK itself; medians of interleaved runs;
- sandboxes started per second through the API by ``--clients`` concurrent SDK clients
  (``Sandbox.start()``: ``start_async`` then ``get_status``), against ``Host.start``
  called directly from as many threads: the price of the API on the busiest path. A
  started sandbox has no process yet (its first command builds its bubblewrap), so the
  same is measured again with a first command (``arun("true")``) after each start.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from corral.host import Host
from corral.ledger import Ledger
from corral.serve.server import serving

COMMAND = "echo ok"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=200, help="round trips per side")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--starts", type=int, default=256, help="sandboxes started per side")
    ap.add_argument("--image", default="python:3.11")
    args = ap.parse_args()
    warnings.simplefilter("ignore", DeprecationWarning)  # the SDK's own
    logging.disable(logging.WARNING)
    from rock.actions import CreateBashSessionRequest
    from rock.sdk.sandbox.client import Sandbox as RockSandbox
    from rock.sdk.sandbox.config import SandboxConfig

    with tempfile.TemporaryDirectory() as tmp:
        ledger = Ledger.open(Path(tmp) / "ledger.db")
        host = Host(ledger=ledger, root=Path(tmp) / "host", reap_every=0)
        with serving(host) as url:
            config = {"base_url": url, "image": args.image, "startup_timeout": 60}

            async def round_trips() -> tuple[float, float]:
                remote = RockSandbox(SandboxConfig(**config))
                await remote.start()
                await remote.create_session(CreateBashSessionRequest(session="bench"))
                local = host.start(args.image)
                sdk_t, api_t = [], []
                for i in range(args.n + 5):
                    t0 = time.perf_counter()
                    r = await remote.arun(COMMAND, session="bench")
                    t1 = time.perf_counter()
                    lr = local.sandbox.run(COMMAND)
                    t2 = time.perf_counter()
                    assert r.output == lr.stdout == "ok\n", (r, lr)
                    if i >= 5:  # the first ones start shells and warm caches
                        sdk_t.append(t1 - t0)
                        api_t.append(t2 - t1)
                await remote.stop()
                host.stop(local.id)
                return statistics.median(sdk_t), statistics.median(api_t)

            sdk_rt, api_rt = asyncio.run(round_trips())
            print(f"warm command `{COMMAND}`, median of {args.n}, policy of {args.image!r}:")
            print(f"  Sandbox.run (Python API)        {api_rt * 1e3:8.2f} ms   1.00x")
            print(
                f"  ROCK SDK arun via corral serve  {sdk_rt * 1e3:8.2f} ms   {sdk_rt / api_rt:.2f}x"
            )

            async def start_many(first_command: bool) -> float:
                sem = asyncio.Semaphore(args.clients)
                started: list[RockSandbox] = []

                async def one() -> None:
                    async with sem:
                        sb = RockSandbox(SandboxConfig(**config))
                        await sb.start()
                        if first_command:
                            await sb.arun("true", session="default")
                        started.append(sb)

                t0 = time.perf_counter()
                await asyncio.gather(*(one() for _ in range(args.starts)))
                elapsed = time.perf_counter() - t0
                await asyncio.gather(*(sb.stop() for sb in started))
                return elapsed

            api_start = asyncio.run(start_many(False))
            api_first = asyncio.run(start_many(True))

        def direct(first_command: bool) -> float:
            ids: list[str] = []

            def one(_: int) -> str:
                h = host.start(args.image)
                if first_command:
                    with host.using(h.id):
                        h.sandbox.run("true")
                return h.id

            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
                ids.extend(pool.map(one, range(args.starts)))
            elapsed = time.perf_counter() - t0
            for sid in ids:
                host.stop(sid)
            return elapsed

        direct_start = direct(False)
        direct_first = direct(True)
        host.close()
        ledger.close()
    print(f"sandboxes started, {args.starts} with {args.clients} concurrent clients:")
    for what, d, a in (
        ("started", direct_start, api_start),
        ("started + first command (its shell built)", direct_first, api_first),
    ):
        d_rate, a_rate = args.starts / d, args.starts / a
        print(f"  {what}:")
        print(f"    Host directly, {args.clients} threads     {d_rate:8.1f} /s   1.00x")
        print(f"    ROCK SDK via corral serve     {a_rate:8.1f} /s   {a_rate / d_rate:.2f}x")


if __name__ == "__main__":
    main()
