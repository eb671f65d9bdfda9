"""Run attacks for real inside sandboxes, gate on and gate off, with canaries outside.

Each attack of the corpus runs in a fresh sandbox of its own under ``swe`` (with an
empty network allowlist: the harness may not reach real hosts), once with the gate on
and once with it off, the watcher on. An attack succeeds if any canary is touched
(``canaries.py``); the report counts, per category, attempts, gate flags, detector
alerts and canary hits, and the top-level ``canary_hits`` must be 0 both ways.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from corral.ledger import Ledger
from corral.policy import Policy
from corral.redteam.canaries import Canaries, Hit

STAND_IN = "192.0.2.1"  # TEST-NET-1: where placeholders point when there is no namespace


@dataclass(frozen=True, slots=True)
class Attack:
    id: str
    category: str
    command: str


@dataclass
class Outcome:
    attack: Attack
    gate: str  # "on" | "off"
    decision: str | None  # the gate's verdict (None with the gate off)
    ran: bool
    exit_code: int
    timed_out: bool
    alerts: list[str] = field(default_factory=list)  # "category:detector"
    hits: list[Hit] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.attack.id,
            "category": self.attack.category,
            "gate": self.gate,
            "decision": self.decision,
            "ran": self.ran,
            "exit_code": self.exit_code,
            "timed_out": self.timed_out,
            "alerts": self.alerts,
            "canary_hits": [h.to_dict() for h in self.hits],
            "seconds": round(self.seconds, 3),
        }


def load_attacks(path: Path) -> list[Attack]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out.append(Attack(str(row["id"]), str(row["category"]), str(row["command"])))
        except (ValueError, KeyError) as e:
            raise ValueError(f"{path}:{n}: not an attack row ({e})") from None
    return out


@functools.cache
def _targets() -> re.Pattern[str]:
    data = yaml.safe_load(resources.files("corral.redteam").joinpath("targets.yaml").read_text())
    names = [*data["hosts"], *data["addresses"]]
    alt = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return re.compile(rf"(?<![\w.-])(?:{alt})(?![\w-]|\.\w)", re.I)


def retarget(command: str, address: str) -> str:
    """The command with its "outside" hosts pointed at ``address``."""
    return _targets().sub(address, command)


def redteam_policy() -> Policy:
    """``swe`` as an agent would get it, minus every allowed host (no real traffic
    leaves), with tight resources so a fork bomb or a memory hog ends fast."""
    return Policy.load("swe").derived(
        "swe-redteam",
        network={"allow": []},
        resources={"memory": "512MiB", "pids": 128, "cpus": 1.0, "wall_time": "60s"},
        audit={"auditor": "none"},
    )


def run_attacks(
    attacks: Sequence[Attack],
    *,
    timeout: float = 5.0,
    gates: Sequence[str] = ("on", "off"),
    internet: bool = True,
    ledger: Ledger | None = None,
    progress: Callable[[int, int, Outcome], None] | None = None,
    policy: Policy | None = None,
) -> tuple[list[Outcome], Canaries]:
    """``policy`` replaces ``redteam_policy()``: the tests weaken it on purpose to show
    that a breach is seen."""
    from corral.sandbox import Sandbox

    policy = policy or redteam_policy()
    base = Path(tempfile.mkdtemp(prefix="corral-redteam-", dir="/var/tmp"))
    own = ledger is None
    led = ledger or Ledger.memory()
    outcomes: list[Outcome] = []
    total = len(attacks) * len(gates)
    try:
        with Canaries(base, internet=internet) as canaries:
            address = canaries.internet_ip or STAND_IN
            stray = canaries.check()  # anything before the first attack is the host's
            if stray:
                raise RuntimeError(f"a canary fired before any attack ran: {stray[0]}")
            n = 0
            for attack in attacks:
                command = retarget(attack.command, address)
                for gate in gates:
                    n += 1
                    ws = canaries.workspace_root / f"{n:04d}"
                    ws.mkdir()
                    t0 = time.monotonic()
                    with Sandbox(
                        policy,
                        ws,
                        gate=gate == "on",
                        ledger=led,
                        run_id=f"redteam:{attack.id}:{gate}",
                        task="fix the failing test in tests/test_utils.py",
                        auditor=False,
                    ) as sb:
                        r = sb.run(command, timeout=timeout)
                        # What a detached process does after the command returned.
                        if r.decision is None or r.decision.allowed:
                            time.sleep(0.3)
                        alerts = [f"{a.category.value}:{a.detector}" for a in sb.alerts]
                    o = Outcome(
                        attack,
                        gate,
                        r.decision.verdict.value if r.decision else None,
                        r.decision is None or r.decision.allowed,
                        r.exit_code,
                        r.timed_out,
                        sorted(set(alerts)),
                        canaries.check([r.stdout, r.stderr]),
                        time.monotonic() - t0,
                    )
                    shutil.rmtree(ws, ignore_errors=True)
                    outcomes.append(o)
                    if progress is not None:
                        progress(n, total, o)
            late = canaries.check()
            if late and outcomes:
                outcomes[-1].hits.extend(late)
    finally:
        if own:
            led.close()
        shutil.rmtree(base, ignore_errors=True)
    return outcomes, canaries


def summarize(outcomes: Sequence[Outcome], canaries: Canaries) -> dict[str, Any]:
    per: dict[str, dict[str, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
    for o in outcomes:
        c = per[o.attack.category][o.gate]
        c["attempts"] += 1
        c["gate_flags"] += int(o.decision in ("deny", "ask"))
        c["ran"] += int(o.ran)
        c["detector_alerts"] += int(bool(o.alerts))
        c["right_alert"] += int(any(a.startswith(o.attack.category + ":") for a in o.alerts))
        c["canary_hits"] += int(bool(o.hits))
    hits = {g: sum(bool(o.hits) for o in outcomes if o.gate == g) for g in ("on", "off")}
    return {
        "canary_hits": sum(hits.values()),
        "canary_hits_by_gate": hits,
        "canaries": list(canaries.active),
        "canaries_unavailable": canaries.unavailable,
        "attacks": len({o.attack.id for o in outcomes}),
        "runs": len(outcomes),
        "per_category": {
            cat: {gate: dict(c) for gate, c in sorted(g.items())} for cat, g in sorted(per.items())
        },
        "hits": [{**o.to_dict(), "command": o.attack.command[:300]} for o in outcomes if o.hits],
    }
