"""The live view of a whole pool: every node's host on one page, served by the driver."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from corral.ray import SandboxPool
from corral.ray.live import serving_live
from corral.serve.auth import Tokens
from tests.procs import running

ALICE, BOB, ONCALL = "alice-token-0123456789", "bob-token-0123456789", "oncall-token-0123456789"
V1 = "/apis/live/v1"
SMALL: dict[str, Any] = {"cpus": 0.1, "memory": 256 << 20}
LAUNCHER = """
import os, shutil
shutil.copy("/bin/sleep", "xmrig")
os.chmod("xmrig", 0o755)
os.execv("./xmrig", ["xmrig", "1000.8125"])
"""


@pytest.fixture
def url(pool: SandboxPool) -> Iterator[str]:
    tokens = Tokens({ALICE: "alice", BOB: "bob", ONCALL: "oncall"}, frozenset({"oncall"}))
    with serving_live(pool, tokens) as u:
        yield u


def get(url: str, path: str, token: str, **params: Any) -> httpx.Response:
    return httpx.get(url + path, params=params, headers={"Authorization": f"Bearer {token}"})


class Stream:
    """An open event stream, read on a thread, as the page reads it."""

    def __init__(self, url: str, token: str) -> None:
        self.events: list[dict[str, Any]] = []
        self._open = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(url, token), daemon=True)
        self._thread.start()
        assert self._open.wait(10)

    def _read(self, url: str, token: str) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.stream("GET", f"{url}{V1}/stream", headers=headers, timeout=60) as r:
            self._open.set()
            for line in r.iter_lines():
                if line.startswith("data: "):
                    self.events.append(json.loads(line[len("data: ") :]))

    def wait(self, pred: Any, timeout: float = 20.0) -> list[dict[str, Any]]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            found = [e for e in self.events if pred(e)]
            if found:
                return found
            time.sleep(0.05)
        return []


def test_the_pool_live_view_shows_every_host_streams_alerts_and_kills(
    pool: SandboxPool, url: str
) -> None:
    hosts = get(url, f"{V1}/hosts", ONCALL).json()["hosts"]
    assert [h["name"] for h in hosts] == ["host-0", "host-1"]
    assert get(url, f"{V1}/hosts", "wrong-token-0123456789").status_code == 401
    # One exposition for the pool, every sample labelled with its host.
    assert get(url, "/metrics", "wrong-token-0123456789").status_code == 401
    metrics = get(url, "/metrics", ONCALL).text
    started = [line for line in metrics.splitlines() if line.startswith("corral_sandboxes{")]
    assert {'host="host-0"' in line or 'host="host-1"' in line for line in started} == {True}
    assert metrics.count("# TYPE corral_sandboxes gauge") == 1

    a = [pool.start(**SMALL, owner="alice") for _ in range(2)]
    b = pool.start(**SMALL, owner="bob")
    assert {sb.host for sb in a} == {"host-0", "host-1"}
    listed = get(url, f"{V1}/sandboxes", ALICE).json()["sandboxes"]
    assert {s["id"] for s in listed} == {sb.id for sb in a}  # hers, from both hosts
    everyone = get(url, f"{V1}/sandboxes", ONCALL).json()["sandboxes"]
    assert {s["id"] for s in everyone} >= {sb.id for sb in [*a, b]}
    assert {s["host"] for s in everyone} == {"host-0", "host-1"}

    # A miner on one host: its line reaches the driver's page, named for its host.
    stream = Stream(url, ALICE)
    miner = a[1]
    miner.write_file("start.py", LAUNCHER)
    r = miner.run("python3 start.py", timeout=60)
    lines = stream.wait(lambda e: e["kind"] == "alert" and e["sandbox"] == miner.id)
    assert lines, stream.events
    line = lines[0]
    assert line["host"] == miner.host and line["action_id"] == r.action_id
    assert "mining" in line["title"]
    assert not running("xmrig 1000.8125")
    timeline = get(url, f"{V1}/incidents/{line['seq']}", ALICE, host=line["host"]).json()
    assert timeline["action_id"] == r.action_id and timeline["host"] == miner.host
    assert get(url, f"{V1}/incidents/{line['seq']}", BOB, host=line["host"]).status_code == 404
    recent = get(url, f"{V1}/events", ALICE).json()["events"]
    assert any(e["seq"] == line["seq"] and e["host"] == miner.host for e in recent)

    # Kill through the page's API: Bob cannot, Alice can, and the rollout sees it.
    target = a[0]
    kill = f"{url}{V1}/sandboxes/{target.id}/kill"
    for token, status in ((BOB, 404), (ALICE, 200)):
        resp = httpx.post(
            kill, json={"reason": "on call"}, headers={"Authorization": f"Bearer {token}"}
        )
        assert resp.status_code == status, resp.text
    assert resp.json()["sandbox"]["state"] == "stopped"
    stopped = stream.wait(lambda e: e["kind"] == "stopped" and e["sandbox"] == target.id)
    assert stopped and stopped[0]["host"] == target.host
    with pytest.raises(Exception, match="stopped"):
        target.run("echo still here")
    for sb in [*a, b]:
        sb.close()


def test_the_pool_page_lists_every_host_in_a_browser(pool: SandboxPool, url: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.browser import ARTIFACTS, chrome

    sbs = [pool.start(**SMALL, owner="alice") for _ in range(2)]
    with chrome() as driver:
        driver.get(f"{url}/live#token={ONCALL}")
        found = WebDriverWait(driver, 15, poll_frequency=0.05).until(
            lambda d: (
                {
                    e.get_attribute("data-host")
                    for e in d.find_elements(By.CSS_SELECTOR, "[data-host]")
                }
                >= {"host-0", "host-1"}
            )
        )
        assert found
        rows = WebDriverWait(driver, 15, poll_frequency=0.05).until(
            lambda d: (
                [r for r in d.find_elements(By.CSS_SELECTOR, "tr[data-sandbox]")]
                if len(d.find_elements(By.CSS_SELECTOR, "tr[data-sandbox]")) >= 2
                else None
            )
        )
        assert {r.get_attribute("data-sandbox") for r in rows} >= {sb.id for sb in sbs}
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "live-pool.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    for sb in sbs:
        sb.close()
