"""What a run did, from its ledger records: an incident summary and a self-contained HTML
report (``corral report``).

Pure functions over records (no I/O): ``build`` sorts them into steps and incidents,
``render_text`` gives the terminal summary, ``render_html`` one HTML file with inline
CSS and SVG, no scripts and nothing fetched, so it can be mailed or attached to a ticket.

An incident is anything that stopped or flagged an action, named by the layer that did
it: ``gate`` (a denial before anything ran), ``audit`` (the auditor flagged it),
``watch`` (a detector matched what a process did), ``egress`` (the proxy refused a
connection), ``contain`` (the sandbox's own limits: a kill, out of memory, the process
limit, a stop when something it depends on died).
"""

from __future__ import annotations

import datetime as dt
import html
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from corral.ledger.export import record_command


@dataclass(frozen=True, slots=True)
class Incident:
    t: float
    layer: str
    category: str | None
    what: str  # the rule or detector
    detail: str
    step: int | None
    command: str | None
    reaction_ms: float | None  # how long the layer took (decision time, time to respond)


@dataclass
class StepRow:
    step: int | None
    action_id: str
    command: str = ""
    t: float = 0.0
    gate: str | None = None
    audit: str | None = None
    exit_code: int | None = None
    duration_s: float | None = None
    cpu_s: float | None = None
    peak_memory: int | None = None
    alerts: list[str] = field(default_factory=list)


@dataclass
class Report:
    run_id: str | None
    start: float
    end: float
    steps: list[StepRow]
    incidents: list[Incident]
    counts: dict[str, int]
    records: int


def _body(rec: Mapping[str, Any]) -> Mapping[str, Any]:
    body = rec.get("body")
    return body if isinstance(body, Mapping) else {}


def build(records: Iterable[Mapping[str, Any]], run_id: str | None = None) -> Report:
    """Records as ``Record.to_dict()`` gives them, oldest first."""
    recs = list(records)
    steps: dict[str, StepRow] = {}
    incidents: list[Incident] = []
    counts: Counter[str] = Counter()

    def row(rec: Mapping[str, Any]) -> StepRow | None:
        aid = rec.get("action_id")
        if not isinstance(aid, str):
            return None
        r = steps.get(aid)
        if r is None:
            r = steps[aid] = StepRow(rec.get("step"), aid, t=float(rec["ts"]))
        return r

    # Every action's text first: an alert is often recorded before its command returns.
    commands: dict[str, str] = {}
    for rec in recs:
        aid = rec.get("action_id")
        if isinstance(aid, str) and aid not in commands:
            text = record_command(rec)
            if text is not None:
                commands[aid] = text
    for rec in recs:
        b, kind, t = _body(rec), rec.get("kind"), float(rec["ts"])
        counts[str(kind)] += 1
        cmd = commands.get(str(rec.get("action_id")), "")
        if kind in ("decision", "audit"):
            r = row(rec)
            gate = kind == "decision"
            v = b.get("decision", {}) if gate else b
            verdict = v.get("decision") if gate else v.get("verdict")
            if r is not None:
                r.command = r.command or cmd
                if gate:
                    r.gate = verdict
                else:
                    r.audit = verdict
            if verdict in ("deny", "ask"):
                counts[f"gate:{verdict}" if gate else "audit:flagged"] += 1
                incidents.append(
                    Incident(
                        t,
                        "gate" if gate else "audit",
                        v.get("category"),
                        str(v.get("rule") if gate else v.get("auditor")),
                        str(v.get("reason")),
                        rec.get("step"),
                        cmd,
                        v.get("latency_ms"),
                    )
                )
        elif kind == "exec":
            r = row(rec)
            if r is not None:
                r.command = r.command or cmd
                r.exit_code, r.duration_s = b.get("exit_code"), b.get("duration_s")
                r.cpu_s, r.peak_memory = b.get("cpu_s"), b.get("peak_memory")
            limit = next(
                (
                    label
                    for key, label in (
                        ("oom_killed", "out of memory"),
                        ("pids_limited", "process limit"),
                        ("timed_out", "wall-time limit"),
                    )
                    if b.get(key)
                ),
                None,
            )
            if limit:
                incidents.append(
                    Incident(
                        t,
                        "contain",
                        None,
                        limit,
                        f"the sandbox's {limit} ended it",
                        rec.get("step"),
                        cmd,
                        None,
                    )
                )
        elif kind == "alert":
            r = row(rec)
            if r is not None:
                r.alerts.append(f"{b.get('category')}: {b.get('detector')}")
            response = str(b.get("response") or "")
            layer = "egress" if response.startswith("refused by the egress proxy") else "watch"
            evidence = b.get("evidence") or []
            # From the first evidence (an exec, a sample) to the alert being recorded,
            # which the watcher does as it responds.
            first = min((float(e.get("time", t)) for e in evidence), default=None)
            reaction = max(0.0, (t - first) * 1000) if first is not None else None
            counts[f"alert:{b.get('category')}"] += 1
            incidents.append(
                Incident(
                    t,
                    layer,
                    b.get("category"),
                    str(b.get("detector")),
                    response,
                    rec.get("step"),
                    cmd or None,
                    reaction,
                )
            )
        elif kind == "event" and b.get("kind") == "net":
            f = b.get("fields") or {}
            if f.get("allowed") is False:
                counts["egress:refused"] += 1
        elif kind == "note" and b.get("event") == "sandbox stopped":
            incidents.append(
                Incident(t, "contain", None, "stopped", str(b.get("reason")), None, None, None)
            )
    ts = [float(r["ts"]) for r in recs] or [0.0]
    ordered = sorted(steps.values(), key=lambda s: s.t)
    return Report(
        run_id,
        min(ts),
        max(ts),
        ordered,
        sorted(incidents, key=lambda i: i.t),
        dict(counts),
        len(recs),
    )


def _short(text: str | None, width: int) -> str:
    text = (text or "").replace("\n", " ⏎ ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _speed(ms: float | None) -> str:
    if ms is None:
        return ""
    return (
        f"{ms * 1000:.0f} µs" if ms < 1 else f"{ms:.0f} ms" if ms < 10_000 else f"{ms / 1000:.1f} s"
    )


def render_text(rep: Report, width: int = 100) -> str:
    """The incident summary: one line per incident, then the totals by layer."""
    lines = [f"incidents of run {rep.run_id} ({len(rep.incidents)}):"]
    for i in rep.incidents:
        when = f"+{i.t - rep.start:6.2f}s"
        step = f"step {i.step}" if i.step is not None else "      "
        fast = _speed(i.reaction_ms)
        head = f"  {when} {step:<8} {i.layer:<8} {(i.category or '-'):<18} {fast:>8}  "
        lines.append(head + _short(i.command or i.detail, max(20, width - len(head))))
    by = Counter(i.layer for i in rep.incidents)
    lines.append(
        "stopped or flagged by layer: "
        + ", ".join(
            f"{layer} {by[layer]}"
            for layer in ("gate", "audit", "egress", "watch", "contain")
            if by[layer]
        )
    )
    return "\n".join(lines)


_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#1d2330}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;padding:4px 6px;border-bottom:1px solid #e3e6ec;vertical-align:top}
th{background:#f4f6fa} code{font:12px ui-monospace,monospace;word-break:break-all}
.gate{color:#b4232c}.audit{color:#8a5a00}.watch{color:#6b2bb5}.egress{color:#0b6a8a}.contain{color:#2f6b2f}
.muted{color:#6b7385} .pill{display:inline-block;padding:1px 8px;border-radius:9px;background:#eef1f6;margin-right:6px}
"""


def _chart(rep: Report, key: str, label: str, scale: float, unit: str) -> str:
    rows = [s for s in rep.steps if getattr(s, key) is not None]
    if not rows:
        return f"<p class=muted>no {label} recorded</p>"
    values = [float(getattr(s, key)) * scale for s in rows]
    top = max(values) or 1.0
    w, h, pad = 1000, 160, 30
    bw = (w - pad) / len(rows)
    bars = []
    for i, (s, v) in enumerate(zip(rows, values, strict=True)):
        bh = (h - 20) * v / top
        x, y = pad + i * bw, h - bh
        color = "#b4232c" if s.alerts else "#4a7bd1"
        tip = html.escape(f"step {s.step}: {v:.3g} {unit} — {_short(s.command, 80)}")
        bars.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(bw - 2, 1):.1f}" height="{bh:.1f}" '
            f'fill="{color}"><title>{tip}</title></rect>'
        )
    return (
        f'<svg viewBox="0 0 {w} {h + 4}" width="100%" role="img" aria-label="{label}">'
        f'<text x="0" y="12" font-size="11" fill="#6b7385">{top:.3g} {unit}</text>'
        f'<line x1="{pad}" y1="{h}" x2="{w}" y2="{h}" stroke="#c9ced8"/>{"".join(bars)}</svg>'
        f"<p class=muted>{label} per command, in order; red: a command with an alert</p>"
    )


def render_html(rep: Report) -> str:
    e = html.escape
    start = dt.datetime.fromtimestamp(rep.start).strftime("%Y-%m-%d %H:%M:%S")
    by = Counter(i.layer for i in rep.incidents)
    pills = "".join(
        f'<span class="pill {layer}">{layer}: {by[layer]}</span>'
        for layer in ("gate", "audit", "egress", "watch", "contain")
        if by[layer]
    )
    inc_rows = "".join(
        f"<tr><td>+{i.t - rep.start:.2f}s</td><td>{'' if i.step is None else i.step}</td>"
        f'<td class="{i.layer}">{i.layer}</td><td>{e(i.category or "-")}</td><td>{e(i.what)}</td>'
        f"<td><code>{e(_short(i.command, 160))}</code><br><span class=muted>{e(_short(i.detail, 220))}</span></td>"
        f"<td>{_speed(i.reaction_ms)}</td></tr>"
        for i in rep.incidents
    )
    step_rows = "".join(
        f"<tr><td>{'' if s.step is None else s.step}</td><td><code>{e(_short(s.command, 140))}</code></td>"
        f"<td>{e(s.gate or '-')}</td><td>{e(s.audit or '-')}</td>"
        f"<td>{'' if s.exit_code is None else s.exit_code}</td>"
        f"<td>{'' if s.duration_s is None else f'{s.duration_s:.3f}s'}</td>"
        f"<td>{'' if s.cpu_s is None else f'{s.cpu_s:.3f}s'}</td>"
        f"<td>{'' if s.peak_memory is None else f'{s.peak_memory / 2**20:.1f} MiB'}</td>"
        f"<td>{e(', '.join(s.alerts))}</td></tr>"
        for s in rep.steps
    )
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>corral report: {e(str(rep.run_id))}</title>
<style>{_CSS}</style></head><body>
<h1>corral report: {e(str(rep.run_id))}</h1>
<p class=muted>{start}, {rep.end - rep.start:.1f} s, {rep.records} ledger records,
{len(rep.steps)} actions, {len(rep.incidents)} incidents</p>
<p>{pills}</p>
<h2>Timeline of incidents</h2>
<table><tr><th>when</th><th>step</th><th>layer</th><th>category</th><th>rule</th><th>what</th><th>how fast</th></tr>
{inc_rows}</table>
<h2>Resources</h2>
{_chart(rep, "cpu_s", "CPU time", 1.0, "s")}
{_chart(rep, "peak_memory", "peak memory", 1 / 2**20, "MiB")}
<h2>Every action</h2>
<table><tr><th>step</th><th>command</th><th>gate</th><th>audit</th><th>exit</th><th>time</th><th>cpu</th><th>memory</th><th>alerts</th></tr>
{step_rows}</table>
<p class=muted>Made by <code>corral report</code> from the hash-chained ledger; check it with <code>corral verify</code>.</p>
</body></html>
"""
