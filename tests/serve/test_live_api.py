"""The live view's API without a browser: who sees what, the stream, the timeline, the
operator role, ``--local-only``'s guards, and the stream's bounds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from corral.host import STARTED, Host, HostEvent
from corral.host.usage import UsageSampler
from corral.ledger import Ledger
from corral.ledger.chain import LedgerRecord
from corral.serve.auth import TokenError, Tokens
from corral.serve.fleet import Caller, HostFleet
from corral.serve.live import CLIENT_QUEUE, STREAMS_PER_USER, Streams, sse
from corral.serve.server import serving
from corral.serve.timeline import entry, incident, live_event
from corral.watch.gpu import FakeGpuBackend, GpuProcess
from corral.watch.watcher import Watcher
from tests.serve.live import ALICE, BOB, LIVE, ONCALL, Live, live_server, process


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    with live_server(tmp_path_factory.mktemp("live-api")) as served:
        yield served


def get(live: Live, path: str, token: str, **params: Any) -> httpx.Response:
    return httpx.get(
        f"{live.url}{LIVE}/{path}", params=params, headers={"Authorization": f"Bearer {token}"}
    )


def test_each_user_sees_their_own_sandboxes_and_an_operator_sees_all(live: Live) -> None:
    a = live.host.start("strict", owner="alice", labels={"experiment_id": "exp-1"})
    b = live.host.start("strict", owner="bob")
    try:

        def ids(token: str) -> set[str]:
            r = get(live, "sandboxes", token)
            assert r.status_code == 200
            return {s["id"] for s in r.json()["sandboxes"]}

        assert a.id in ids(ALICE) and b.id not in ids(ALICE)
        assert b.id in ids(BOB) and a.id not in ids(BOB)
        assert {a.id, b.id} <= ids(ONCALL)
        hosts = get(live, "hosts", ONCALL).json()
        assert hosts["user"] == "oncall" and hosts["operator"] is True
        (h,) = hosts["hosts"]
        assert h["running"] >= 2 and h["uptime_s"] >= 0
        (mine,) = [s for s in get(live, "sandboxes", ALICE).json()["sandboxes"] if s["id"] == a.id]
        assert mine["owner"] == "alice" and mine["labels"] == {
            "experiment_id": "exp-1",
            "profile": "strict",
        }
        assert mine["state"] == "running" and mine["cpus"] > 0 and mine["memory"] > 0
    finally:
        live.host.stop(a.id)
        live.host.stop(b.id)


def test_the_stream_carries_only_what_its_caller_may_see(live: Live) -> None:
    got: list[tuple[str, dict[str, Any]]] = []
    ready, done = threading.Event(), threading.Event()
    mine: list[str] = []

    def read(token: str) -> None:
        with httpx.stream(
            "GET", f"{live.url}{LIVE}/stream", headers={"Authorization": f"Bearer {token}"}
        ) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            name = ""
            for line in r.iter_lines():
                if line.startswith(": corral live stream"):
                    ready.set()
                elif line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    got.append((name, json.loads(line[6:])))
                    if mine and got[-1][1]["sandbox"] == mine[0] and name == "started":
                        done.set()
                        return

    reader = threading.Thread(target=read, args=(ALICE,), daemon=True)
    reader.start()
    assert ready.wait(10)
    b = live.host.start("strict", owner="bob")
    with live.host.using(b.id):
        b.sandbox.run("ssh -fN -R 2222:localhost:22 ops@203.0.113.7")  # a refusal, bob's
    mine.append("alice-stream-check")
    a = live.host.start("strict", owner="alice", sandbox_id="alice-stream-check")
    assert done.wait(10)
    reader.join(5)
    assert [s["sandbox"] for _, s in got] == [a.id]  # nothing of bob's, before or after
    live.host.stop(a.id)
    live.host.stop(b.id)


def test_a_refusal_and_its_timeline(live: Live) -> None:
    h = live.host.start("strict", owner="alice")
    with live.host.using(h.id):
        h.sandbox.run("echo warm-up")
        r = h.sandbox.run("ssh -fN -R 2222:localhost:22 ops@203.0.113.7")
    assert r.refused == "gate"
    # Listeners run as records are written: the refusal is there when the command returns.
    events = get(live, "events", ALICE, limit=50).json()["events"]
    (refusal,) = [e for e in events if e["kind"] == "denial" and e["sandbox"] == h.id]
    assert refusal["title"].startswith("tunnel/") and refusal["category"] == "tunnel"
    assert refusal["what"].startswith("ssh -fN -R") and refusal["action_id"] == r.action_id

    tl = get(live, f"incidents/{refusal['seq']}", ALICE)
    assert tl.status_code == 200, tl.text
    body = tl.json()
    assert body["action_id"] == r.action_id and body["sandbox"] == h.id
    assert body["step"] == 2 and body["command"].startswith("ssh -fN")
    assert [e["label"] for e in body["entries"]] == ["gate deny"]
    # Not bob's to read, and the same answer as for a record that does not exist.
    for seq in (refusal["seq"], 10**9):
        r2 = get(live, f"incidents/{seq}", BOB)
        assert r2.status_code == 404 and r2.json()["error"].startswith("no record")
    assert get(live, f"incidents/{refusal['seq']}", ONCALL).status_code == 200
    assert not [e for e in get(live, "events", BOB).json()["events"] if e["sandbox"] == h.id]

    live.host.freeze(h.id, reason="look", by="oncall")
    live.host.stop(h.id, by="oncall")
    events = get(live, "events", ALICE, limit=50).json()["events"]
    kinds = [e["kind"] for e in events if e["sandbox"] == h.id]
    assert kinds == ["started", "denial", "frozen", "stopped"]
    assert [e["detail"] for e in events if e["sandbox"] == h.id][-2:] == [
        "look (by oncall)",
        "stopped (by oncall)",
    ]


def test_acting_needs_json_and_a_running_sandbox(live: Live) -> None:
    h = live.host.start("strict", owner="alice")
    url = f"{live.url}{LIVE}/sandboxes/{h.id}"
    auth = {"Authorization": f"Bearer {ALICE}"}
    # A cross-site form or no-cors fetch can send only these; neither is accepted.
    for ctype in ("text/plain", "application/x-www-form-urlencoded"):
        r = httpx.post(f"{url}/kill", content=b"{}", headers={**auth, "Content-Type": ctype})
        assert r.status_code == 415 and h.state == "running"
    r = httpx.post(f"{url}/freeze", json={"reason": 7}, headers=auth)
    assert r.status_code == 400
    r = httpx.post(f"{url}/freeze", json={"reason": "inspect the cron file"}, headers=auth)
    assert r.status_code == 200 and r.json()["sandbox"]["state"] == "frozen"
    assert r.json()["sandbox"]["reason"] == "frozen for inspection: inspect the cron file"
    r = httpx.post(f"{url}/freeze", json={}, headers=auth)
    assert r.status_code == 409 and "not running" in r.json()["error"]
    r = httpx.post(f"{url}/kill", json={}, headers=auth)
    assert r.status_code == 200 and r.json()["sandbox"]["state"] == "stopped"
    assert r.json()["sandbox"]["reason"] == "killed from the live view by alice"


def test_the_page_and_its_files_are_served_with_a_strict_policy(live: Live) -> None:
    page = httpx.get(f"{live.url}/live")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert page.headers["referrer-policy"] == "no-referrer"
    # Nothing is loaded from anywhere else (the machines it runs on may have no internet).
    links = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert links == ["data:,", "/live/live.css", "/live/live.js"]  # data:, for no favicon
    for name, ctype in (("live.js", "text/javascript"), ("live.css", "text/css")):
        r = httpx.get(f"{live.url}/live/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(ctype)
    assert httpx.get(f"{live.url}/live/..%2Fapp.py").status_code == 404
    assert httpx.get(f"{live.url}/live/live.html.bak").status_code == 404


def test_local_only_needs_no_token_but_a_loopback_name(tmp_path: Path) -> None:
    with (
        Host(ledger=Ledger.memory(), root=tmp_path / "host", reap_every=0) as host,
        serving(host) as url,
    ):
        h = host.start("strict")
        r = httpx.get(f"{url}{LIVE}/sandboxes")
        assert r.status_code == 200 and [s["id"] for s in r.json()["sandboxes"]] == [h.id]
        assert httpx.get(f"{url}{LIVE}/hosts").json()["local_only"] is True
        # A page on another name that resolves here (DNS rebinding) is refused.
        for name in ("evil.example", "evil.example:80", "192.168.1.5", "127.evil.example"):
            r = httpx.get(f"{url}{LIVE}/sandboxes", headers={"Host": name})
            assert r.status_code == 403 and "loopback" in r.json()["error"]
            r = httpx.post(f"{url}{LIVE}/sandboxes/{h.id}/kill", json={}, headers={"Host": name})
            assert r.status_code == 403
        assert h.state == "running"
        port = url.rsplit(":", 1)[1]
        for name in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "127.0.0.2"):
            assert httpx.get(f"{url}{LIVE}/hosts", headers={"Host": name}).status_code == 200


def test_the_live_view_can_be_left_out(tmp_path: Path) -> None:
    with (
        Host(ledger=Ledger.memory(), root=tmp_path / "host", reap_every=0) as host,
        serving(host, live_view=False) as url,
    ):
        assert httpx.get(f"{url}/live").status_code == 404
        assert httpx.get(f"{url}{LIVE}/sandboxes").status_code == 404
        assert httpx.get(f"{url}/metrics").status_code == 200


def test_shutting_down_ends_open_streams(tmp_path: Path) -> None:
    ended = threading.Event()
    opened = threading.Event()

    def read(url: str) -> None:
        with httpx.stream("GET", f"{url}{LIVE}/stream", timeout=None) as r:
            for line in r.iter_lines():
                if line.startswith(":"):
                    opened.set()
        ended.set()

    with Host(ledger=Ledger.memory(), root=tmp_path / "host", reap_every=0) as host:
        with serving(host) as url:
            reader = threading.Thread(target=read, args=(url,), daemon=True)
            reader.start()
            assert opened.wait(10)
        # The server did not wait for the page to leave: it ended the stream.
        assert ended.wait(10)


def test_tokens_file_names_operators_explicitly(tmp_path: Path) -> None:
    f = tmp_path / "tokens.yaml"
    t1, t2, t3 = "a" * 20, "b" * 20, "c" * 20
    f.write_text(
        f"alice: {t1}\noncall:\n  tokens: [{t2}]\n  role: operator\nbob: {{token: {t3}}}\n"
    )
    tokens = Tokens.load(f, {})
    assert tokens.user(t2) == "oncall" and tokens.is_operator("oncall")
    assert not tokens.is_operator("alice") and not tokens.is_operator("bob")
    assert tokens.user(t3) == "bob"
    for text, why in (
        (f"x: {{token: {t1}, role: admin}}\n", "role must be one of user, operator"),
        (f"x: {{token: {t1}, rol: operator}}\n", "unknown key 'rol'"),
        (f"x: {{token: {t1}, tokens: [{t2}]}}\n", "either token or tokens"),
        ("x: {role: operator}\n", "either token or tokens"),
    ):
        f.write_text(text)
        with pytest.raises(TokenError, match=why):
            Tokens.load(f, {})


def test_a_page_that_falls_behind_is_told_to_reload(tmp_path: Path) -> None:
    with Host(ledger=Ledger.memory(), root=tmp_path / "host", reap_every=0) as host:
        fleet = HostFleet(host)
        streams = Streams(fleet)

        def alert(seq: int, owner: str = "alice") -> HostEvent:
            body = {"detector": "d", "category": "mining", "severity": "high", "evidence": ()}
            return HostEvent("alert", "sb-1", owner, body, seq=seq, ts=1.0)

        async def run() -> list[str]:
            gen = streams.events(Caller("alice"))
            out = [await anext(gen)]  # the greeting: registered from here on
            host.events.publish(alert(1))
            host.events.publish(alert(2, owner="bob"))
            await asyncio.sleep(0)
            out.append(await anext(gen))
            for i in range(CLIENT_QUEUE + 1):
                host.events.publish(alert(10 + i))
            await asyncio.sleep(0)
            out.append(await anext(gen))
            host.events.publish(alert(9999))
            await asyncio.sleep(0)
            out.append(await anext(gen))
            streams.close()
            await asyncio.sleep(0)
            out.extend([chunk async for chunk in gen])
            return out

        greeting, first, lagged, after, *rest = asyncio.run(run())
        assert greeting.startswith("retry: ")
        assert first.startswith("id: 1\nevent: alert\n")
        assert lagged == "event: lagged\ndata: {}\n\n"  # the backlog was dropped
        assert after.startswith("id: 9999\n") and rest == []
        assert len(streams) == 0
        fleet.close()


def test_live_events_and_timeline_lines_from_records() -> None:
    ev = live_event(
        "node-1",
        HostEvent(
            "alert",
            "sb",
            "alice",
            {
                "detector": "resource-hijack-cpu",
                "category": "mining",
                "severity": "high",
                "response": "killed the process",
                "evidence": ({"kind": "resource", "pid": 42, "fields": {"argv": ["xmr", "-o"]}},),
            },
            seq=7,
            ts=3.0,
            action_id="a1",
        ),
    )
    assert ev is not None and ev.title == "mining/resource-hijack-cpu"
    assert ev.what == "xmr -o (pid 42)" and ev.detail == "killed the process"
    assert sse(ev).startswith("id: 7\nevent: alert\ndata: {")
    allowed = HostEvent("decision", "sb", "alice", {"decision": {"decision": "allow"}})
    assert live_event("n", allowed) is None
    assert live_event("n", HostEvent("event", "sb", "alice", {"kind": "exec"})) is None
    started = live_event("n", HostEvent(STARTED, "sb", "alice", {"profile": "swe"}))
    assert started is not None and started.kind == "started" and started.title == "swe"

    def rec(kind: str, body: dict[str, Any]) -> LedgerRecord:
        return LedgerRecord(1, 2.0, kind, None, None, None, None, None, body, "", "")

    closed = entry(
        rec(
            "event",
            {
                "kind": "net",
                "pid": 5,
                "fields": {
                    "type": "net-closed",
                    "host": "pypi.org",
                    "port": 443,
                    "bytes_up": 10,
                    "bytes_down": 20,
                },
            },
        )
    )
    assert closed.label == "net closed" and closed.text == "pypi.org:443 up 10 B, down 20 B"
    assert closed.pid == 5
    stopped = entry(rec("note", {"event": "sandbox stopped", "reason": "done", "by": "bob"}))
    assert (stopped.label, stopped.text) == ("stopped", "sandbox stopped: done (by bob)")
    odd = entry(rec("exec", {"exit_code": None}))  # a shape this code did not expect
    assert odd.label == "ran"


def test_kill_ends_a_command_that_is_still_running(live: Live) -> None:
    sid = str(live.rock("start_async", ALICE, {"image": "strict"})["sandbox_id"])
    answer: list[Any] = []

    def long_command() -> None:
        answer.append(
            httpx.post(
                f"{live.url}/apis/envs/sandbox/v1/execute",
                json={"sandbox_id": sid, "command": "sleep 613"},
                headers={"XRL-Authorization": f"Bearer {ALICE}"},
                timeout=None,
            ).json()
        )

    running = threading.Thread(target=long_command, daemon=True)
    running.start()
    process(live.host.get(sid), "sleep 613", timeout=30)
    r = httpx.post(
        f"{live.url}{LIVE}/sandboxes/{sid}/kill",
        json={"reason": "a stuck rollout"},
        headers={"Authorization": f"Bearer {ALICE}"},
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["sandbox"]["state"] == "stopped"
    running.join(60)
    # The request that was running answers at once, with why.
    assert not running.is_alive() and answer
    assert answer[0]["result"]["exit_code"] == 137, answer
    assert answer[0]["result"]["stderr"] == "corral: the sandbox was stopped: a stuck rollout\n"


def test_usage_samples_carry_cpu_memory_and_gpu(tmp_path: Path) -> None:
    gpu = FakeGpuBackend()
    watcher = Watcher(gpu=gpu)
    try:
        with Host(
            ledger=Ledger.memory(), root=tmp_path / "host", reap_every=0, watch=watcher
        ) as host:
            busy = host.start("rl-agent")
            idle = host.start("strict")
            with host.using(busy.id):
                busy.sandbox.run("nohup sleep 60 > /dev/null 2>&1 &")
            pid = process(busy, "sleep 60")
            # Under the gpu-hijack detector's threshold: this is about the samples.
            gpu.set([GpuProcess(pid=pid, gpu=0, memory=1 << 30, util=25.0)])
            sampler = UsageSampler(host, keep=3)
            for _ in range(4):
                sampler.sample()
            samples = sampler.samples(busy.id)
            assert len(samples) == 3  # a ring of the last `keep`
            assert all(s.cpu is not None and s.cpu >= 0 for s in samples)
            assert all(s.memory is not None and s.memory > 0 for s in samples)
            assert [s.gpu for s in samples] == [25.0] * 3
            assert sampler.samples(idle.id)[-1].gpu == 0.0
            host.stop(busy.id)
            sampler.sample()
            assert len(sampler.samples(busy.id)) == 3  # kept while the host lists it
            host.delete(busy.id)
            sampler.sample()
            assert sampler.samples(busy.id) == ()
    finally:
        watcher.close()
    with Host(ledger=Ledger.memory(), root=tmp_path / "h2", reap_every=0, watch=False) as host:
        h = host.start("strict")
        sampler = UsageSampler(host)
        sampler.sample()
        (s,) = sampler.samples(h.id)
        assert s.gpu is None and s.cpu is None  # no GPU telemetry; no CPU rate yet


def test_a_user_may_hold_only_so_many_streams(live: Live) -> None:
    url = f"{live.url}{LIVE}/stream"
    limits = httpx.Limits(max_connections=STREAMS_PER_USER + 4)
    with httpx.Client(timeout=10, limits=limits) as client, contextlib.ExitStack() as pages:
        readers = []  # held: dropping a reader closes its connection
        for _ in range(STREAMS_PER_USER):
            r = pages.enter_context(client.stream("GET", url, headers=auth(ALICE)))
            readers.append(r.iter_lines())
            assert next(readers[-1]).startswith("retry:")  # open, and counted
        r = client.get(url, headers=auth(ALICE))
        assert r.status_code == 429 and "streams open already" in r.json()["error"]
        with client.stream("GET", url, headers=auth(BOB)) as r:
            assert r.status_code == 200  # another user's pages are not affected


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_an_incident_keeps_its_action_and_what_its_sandbox_did_next() -> None:
    def rec(seq: int, kind: str, body: dict[str, Any], action: str | None = None) -> LedgerRecord:
        return LedgerRecord(seq, float(seq), kind, "run-1", 3, 9, action, None, body, "", "")

    mine = {"labels": {"owner": "alice", "sandbox": "sb-1"}}
    other = {"labels": {"owner": "bob", "sandbox": "sb-2"}}
    decision = rec(
        4,
        "decision",
        {
            **mine,
            "action": {"payload": {"command": "nohup ./x &"}},
            "decision": {"decision": "allow"},
        },
        "a1",
    )
    alert = rec(9, "alert", {**mine, "category": "mining", "detector": "d"}, "a1")
    after = [
        rec(10, "note", {**other, "event": "sandbox stopped", "reason": "theirs"}),
        rec(11, "note", {**mine, "event": "file written", "path": "x"}),
        rec(12, "note", {**mine, "event": "sandbox frozen", "reason": "look", "by": "oncall"}),
    ]
    tl = incident("node-1", alert, [decision, alert], after, limit=400)
    assert (tl.sandbox, tl.owner, tl.run_id, tl.episode, tl.step) == (
        "sb-1",
        "alice",
        "run-1",
        3,
        9,
    )
    assert tl.command == "nohup ./x &" and tl.action_id == "a1" and not tl.truncated
    assert [(e.seq, e.label) for e in tl.entries] == [
        (4, "gate allow"),
        (9, "ALERT"),
        (12, "frozen"),
    ]
    assert tl.entries[-1].text == "sandbox frozen: look (by oncall)"
    cut = incident("node-1", alert, [decision, decision], [], limit=1)
    assert cut.truncated and [e.seq for e in cut.entries] == [4, 9]  # the record itself stays
