"""The GPU checks that need a real NVIDIA GPU: run on a machine with one.

    python bench/gpu_check.py [-n 3] [--json gpu_check.json]

Against the real driver and NVML (no fakes), in real sandboxes, it checks and prints:
- a grant gives CUDA exactly the granted GPU (CUDA's device count inside is 1, named as
  NVML names it) and a sandbox without a grant has no ``/dev/nvidia*`` and no CUDA device;
- a CUDA busy loop run in the foreground of its action (training) raises no alert;
- a CUDA busy loop left running in the background after its action returned (a miner) is
  caught by ``resource-hijack-gpu`` and killed, with the right action id; over ``-n``
  fresh sandboxes, the median time from the loop's first kernel to its alert and to its
  death. The rule waits for 3 s of sustained use by design, so that is the floor.

The loop is ``cuda_spin.py`` beside this file (ctypes and PTX: only the driver needed).
Exit status: 0 all checks held, 1 one failed (said which), 2 no GPU here to check.
``bench/device-gpu-check.sh`` runs this on a lent machine that has none of corral's
dependencies installed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from corral.ledger import Ledger
from corral.policy import Policy
from corral.sandbox import Sandbox
from corral.sandbox.gpus import machine_uuids
from corral.watch.gpu import NvmlBackend
from corral.watch.watcher import Watcher

SPIN = Path(__file__).with_name("cuda_spin.py")
RULE = "resource-hijack-gpu"


def policy(gpus: int) -> Policy:
    return Policy.from_dict(
        {
            "version": 1,
            "extends": "strict",
            "commands": {"default": "allow", "threats": False},
            "resources": {"gpus": gpus, "memory": "16GiB", "cpus": 4},
        }
    )


def first_json(text: str) -> dict[str, Any]:
    for line in text.splitlines():
        if line.startswith("{"):
            got: dict[str, Any] = json.loads(line)
            return got
    return {"error": f"no JSON in {text!r}"}


class Check:
    def __init__(self) -> None:
        self.results: dict[str, Any] = {}
        self.failed: list[str] = []

    def expect(self, name: str, ok: bool, detail: Any) -> None:
        self.results[name] = {"ok": ok, "detail": detail}
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
        if not ok:
            self.failed.append(name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=3, help="detection runs (default 3)")
    ap.add_argument("--json", type=Path, help="write every figure here too")
    ap.add_argument("--gpu", type=int, help="the device number to grant (default: the first)")
    args = ap.parse_args()

    nvml = NvmlBackend.open()
    if nvml is None:
        print(f"gpu_check: no GPU to check here: {NvmlBackend.last_error}", file=sys.stderr)
        return 2
    if shutil.which("bwrap") is None:
        print("gpu_check: bubblewrap (bwrap) is not on PATH", file=sys.stderr)
        return 2
    devices = sorted(int(p.name[6:]) for p in Path("/dev").glob("nvidia[0-9]*"))
    uuids = dict(machine_uuids())
    ids = [args.gpu] if args.gpu is not None else devices[:1]
    check = Check()
    check.results["machine"] = {"device_nodes": devices, "uuids": uuids}
    print(f"GPUs: device nodes {devices}, UUIDs {uuids}", flush=True)
    watcher = Watcher(gpu=nvml)
    work = Path(tempfile.mkdtemp(prefix="corral-gpu-check-"))
    # The loop needs no corral, only a Python the sandbox can see: the system's, on the
    # sandbox's PATH; else this one's, if the policy does not hide where it lives.
    on_path = any(Path(d, "python3").exists() for d in ("/usr/bin", "/usr/local/bin", "/bin"))
    py = "python3" if on_path else sys.executable
    try:
        with Ledger.open(work / "ledger.db") as ledger:
            grant(check, ledger, watcher, work, py, ids)
            foreground(check, ledger, watcher, work, py, ids)
            detection(check, ledger, watcher, work, py, ids, args.n)
    finally:
        watcher.close()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(check.results, indent=2, default=str))
    print("all GPU checks held" if not check.failed else f"FAILED: {', '.join(check.failed)}")
    return 1 if check.failed else 0


def workspace(work: Path, name: str) -> Path:
    ws = work / name
    ws.mkdir()
    shutil.copy(SPIN, ws / "cuda_spin.py")
    return ws


def grant(check: Check, ledger: Ledger, w: Watcher, work: Path, py: str, ids: list[int]) -> None:
    ws = workspace(work, "grant")
    with Sandbox(policy(1), ws, gate=False, ledger=ledger, watch=w, gpu_ids=ids) as sb:
        env = sb.run(
            "echo $CUDA_VISIBLE_DEVICES; ls /dev | grep nvidia | tr '\\n' ' ';"
            " echo; echo sysfs entries: $(ls /sys | wc -l)"
        )
        r = sb.run(f"{py} cuda_spin.py count", timeout=120)
    seen = first_json(r.stdout)
    check.expect(
        "granted sandbox sees exactly its GPU",
        seen.get("count") == 1,
        {"cuda": seen, "env_and_dev": env.stdout.strip(), "stderr": r.stderr[-500:]},
    )
    ws = workspace(work, "none")
    with Sandbox(policy(0), ws, gate=False, ledger=ledger, watch=w) as sb:
        nodes = sb.run("ls /dev | grep -c nvidia || true").stdout.strip()
        r = sb.run(f"{py} cuda_spin.py count", timeout=120)
    seen = first_json(r.stdout)
    check.expect(
        "ungranted sandbox has no GPU",
        nodes == "0" and "count" not in seen,
        {"nvidia_nodes": nodes, "cuda": seen},
    )


def foreground(
    check: Check, ledger: Ledger, w: Watcher, work: Path, py: str, ids: list[int]
) -> None:
    ws = workspace(work, "train")
    with Sandbox(policy(1), ws, gate=False, ledger=ledger, watch=w, gpu_ids=ids) as sb:
        r = sb.run(f"{py} cuda_spin.py spin 8", timeout=120)
        alerts = [a.detector for a in sb.alerts]
    check.expect(
        "a GPU loop inside its own action is not flagged",
        r.exit_code == 0 and not alerts,
        {"exit": r.exit_code, "alerts": alerts, "out": r.stdout.strip()[-300:]},
    )


def detection(
    check: Check, ledger: Ledger, w: Watcher, work: Path, py: str, ids: list[int], n: int
) -> None:
    to_alert: list[float] = []
    to_kill: list[float] = []
    runs: list[dict[str, Any]] = []
    for i in range(n):
        ws = workspace(work, f"miner{i}")
        with Sandbox(policy(1), ws, gate=False, ledger=ledger, watch=w, gpu_ids=ids) as sb:
            r = sb.run(f"nohup {py} cuda_spin.py spin 120 > spin.log 2>&1 & echo $!")
            deadline = time.monotonic() + 30
            alert = None
            while time.monotonic() < deadline and alert is None:
                alert = next((a for a in sb.alerts if a.detector == RULE), None)
                time.sleep(0.05)
            gone = None
            while alert is not None and time.monotonic() < deadline:
                if "spin" not in sb.run("ps -eo args").stdout:
                    gone = time.time()
                    break
                time.sleep(0.05)
            log = (ws / "spin.log").read_text() if (ws / "spin.log").exists() else ""
        start = first_json(log).get("t")
        run: dict[str, Any] = {
            "alert": alert.detector if alert else None,
            "right_action": alert is not None and alert.action_id == r.action_id,
            "log": log[-300:],
        }
        if alert is not None and isinstance(start, float):
            run["to_alert_s"] = round(alert.time - start, 3)
            to_alert.append(alert.time - start)
            if gone is not None:
                run["to_kill_s"] = round(gone - start, 3)
                to_kill.append(gone - start)
        runs.append(run)
        print(f"  run {i + 1}/{n}: {run}", flush=True)
    ok = len(to_kill) == n and all(r["right_action"] for r in runs)
    figures = {
        "runs": runs,
        "median_to_alert_s": round(statistics.median(to_alert), 3) if to_alert else None,
        "median_to_kill_s": round(statistics.median(to_kill), 3) if to_kill else None,
    }
    check.expect(f"a background CUDA loop is caught by {RULE} and killed", ok, figures)


if __name__ == "__main__":
    sys.exit(main())
