"""Trajectories out of the ledger, labelled: safety data for training (``corral export``).

One trajectory per (run id, episode). Each step carries what the agent asked for and
what every layer made of it: the gate's decision, the auditor's verdict, how it ran, the
watcher's alerts. A trajectory is *flagged* when any step was denied or asked about with
a threat category, flagged by the auditor, or raised an alert; its ``categories`` are the
threat categories seen, its ``flagged_steps`` the steps concerned. Pure function over
records (``Record.to_dict()``), no I/O.

Schema (one JSON object per trajectory; ``schema`` names this version):

    {"schema": "corral.trajectory/1", "run_id", "episode", "task", "flagged",
     "categories": [...], "flagged_steps": [...],
     "steps": [{"step", "action_id", "command", "time",
                "decision": {"verdict", "rule", "category", "reason"} | null,
                "audit": {"verdict", "score", "category", "reason", "auditor"} | null,
                "exec": {"exit_code", "duration_s", "timed_out"} | null,
                "alerts": [{"detector", "category", "severity", "response"}]}]}
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

SCHEMA = "corral.trajectory/1"


def record_command(rec: Mapping[str, Any]) -> str | None:
    """The command a decision, audit or exec record is about (None for other kinds)."""
    body = rec.get("body")
    if not isinstance(body, Mapping):
        return None
    if rec.get("kind") in ("decision", "audit"):
        return str(body.get("action", {}).get("payload", {}).get("command", ""))
    if rec.get("kind") == "exec":
        return str(body.get("command") or " ".join(map(str, body.get("argv") or [])))
    return None


def _step(steps: dict[str, dict[str, Any]], rec: Mapping[str, Any]) -> dict[str, Any] | None:
    aid = rec.get("action_id")
    if not isinstance(aid, str):
        return None
    s = steps.get(aid)
    if s is None:
        s = steps[aid] = {
            "step": rec.get("step"),
            "action_id": aid,
            "command": None,
            "time": rec.get("ts"),
            "decision": None,
            "audit": None,
            "exec": None,
            "alerts": [],
        }
    return s


def trajectories(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every trajectory the records hold, in the order they began."""
    by_key: dict[tuple[str | None, int | None], dict[str, Any]] = {}
    steps: dict[tuple[str | None, int | None], dict[str, dict[str, Any]]] = {}
    episode_of: dict[str, int | None] = {}  # action id -> episode, for records without one
    run_task: dict[str, str] = {}
    for rec in records:
        run = rec.get("run_id")
        if not isinstance(run, str):
            continue
        body = rec.get("body") if isinstance(rec.get("body"), Mapping) else {}
        assert isinstance(body, Mapping)
        kind = rec.get("kind")
        if kind == "note":
            if isinstance(body.get("task"), str):
                run_task.setdefault(run, body["task"])
            continue
        aid = rec.get("action_id")
        if not isinstance(aid, str) or kind not in ("decision", "audit", "exec", "alert"):
            continue
        episode = rec.get("episode")
        if episode is None and isinstance(aid, str):
            episode = episode_of.get(aid)
        elif isinstance(aid, str):
            episode_of[aid] = episode
        key: tuple[str | None, int | None] = (run, episode)
        traj = by_key.get(key)
        if traj is None:
            traj = by_key[key] = {"schema": SCHEMA, "run_id": run, "episode": episode, "task": None}
            steps[key] = {}
        s = _step(steps[key], rec)
        if s is None:
            continue
        if kind in ("decision", "audit"):
            action = body.get("action", {})
            s["command"] = s["command"] or record_command(rec)
            if traj["task"] is None and action.get("task"):
                traj["task"] = action.get("task")
        if kind == "decision":
            d = body.get("decision", {})
            s["decision"] = {k: d.get(k) for k in ("rule", "category", "reason")} | {
                "verdict": d.get("decision")
            }
        elif kind == "audit":
            s["audit"] = {
                k: body.get(k) for k in ("verdict", "score", "category", "reason", "auditor")
            }
        elif kind == "exec":
            s["command"] = s["command"] or record_command(rec)
            s["exec"] = {k: body.get(k) for k in ("exit_code", "duration_s", "timed_out")}
        elif kind == "alert":
            s["alerts"].append(
                {k: body.get(k) for k in ("detector", "category", "severity", "response")}
            )
    out = []
    for key, traj in by_key.items():
        if traj["task"] is None:
            traj["task"] = run_task.get(str(key[0]))
        ordered = sorted(steps[key].values(), key=lambda st: st["time"] or 0.0)
        cats: set[str] = set()
        flagged_steps = []
        for st in ordered:
            hit = False
            d, a = st["decision"], st["audit"]
            if d and d["verdict"] in ("deny", "ask") and d["category"]:
                cats.add(d["category"])
                hit = True
            if a and a["verdict"] in ("deny", "ask"):
                if a["category"]:
                    cats.add(a["category"])
                hit = True
            for al in st["alerts"]:
                if al["category"]:
                    cats.add(al["category"])
                hit = True
            if hit and st["step"] not in flagged_steps:
                flagged_steps.append(st["step"])
        traj["flagged"] = bool(flagged_steps)
        traj["categories"] = sorted(cats)
        traj["flagged_steps"] = flagged_steps
        traj["steps"] = ordered
        out.append(traj)
    return out
