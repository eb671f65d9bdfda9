"""The ``corral`` command line.

Exit codes follow the architecture doc: for ``check``, 0 allow, 1 deny or ask, 2 usage or
policy error. Heavy modules are imported inside the commands so ``corral check`` starts
fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

from corral import __version__
from corral.errors import CorralError, PolicyError
from corral.paths import corral_home, default_ledger_path

if TYPE_CHECKING:
    from corral.ledger import Ledger, LedgerRecord
    from corral.model import Action, Decision
    from corral.policy import Policy
    from corral.sandbox import Result

EXIT_OK = 0
EXIT_FLAGGED = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse exits 2 too; keep one message format
        self.print_usage(sys.stderr)
        print(f"corral: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _add_state(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--home", help="state directory (default: $CORRAL_HOME or ~/.local/share/corral)"
    )
    p.add_argument("--ledger", help="ledger file (default: HOME/ledger.db)")


def _add_sandbox(p: argparse.ArgumentParser) -> None:
    """Options shared by the commands that run something in a sandbox."""
    p.add_argument(
        "--policy", default="strict", help="preset name or policy file (default: strict)"
    )
    p.add_argument("--workspace", default=".", help="directory bound read-write (default: .)")
    p.add_argument("--no-gate", action="store_true", help="skip the gate: test containment alone")
    p.add_argument("--run-id", default=os.environ.get("CORRAL_RUN_ID"))
    _add_state(p)


def _add_mcp_serving(p: argparse.ArgumentParser) -> None:
    """Options shared by ``mcp`` and ``mcp-gateway``."""
    p.add_argument(
        "--policy", default="strict", help="preset name or policy file (default: strict)"
    )
    p.add_argument("--workspace", default=".", help="the directory the tools work in (default: .)")
    p.add_argument("--no-gate", action="store_true", help="skip the gate: test containment alone")
    p.add_argument("--transport", choices=("stdio", "http"), default="stdio")
    p.add_argument("--host", default="127.0.0.1", help="address for http (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port for http (default 8765)")
    p.add_argument("--task", help="the agent's task, for the auditor")
    p.add_argument("--run-id", default=os.environ.get("CORRAL_RUN_ID"))
    _add_state(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="corral", description="Contain autonomous AI agents.")
    parser.add_argument("--version", action="version", version=f"corral {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    c = sub.add_parser("check", help="decide about a shell command without running it")
    c.add_argument("--policy", default="swe", help="preset name or policy file (default: swe)")
    c.add_argument("--json", action="store_true", help="one JSON object per decision")
    c.add_argument(
        "--batch", metavar="FILE", help='JSONL file (or - for stdin) of {"command": ...}'
    )
    c.add_argument(
        "--run-id",
        default=os.environ.get("CORRAL_RUN_ID"),
        help="run id recorded with each decision",
    )
    c.add_argument("--no-record", action="store_true", help="do not write decisions to the ledger")
    c.add_argument(
        "--tool",
        metavar="SERVER/TOOL",
        help="decide a tool call instead of a command (the policy's tools section)",
    )
    c.add_argument(
        "--args", metavar="JSON", default="{}", help="the tool call's arguments (a JSON object)"
    )
    c.add_argument(
        "--workspace",
        default=".",
        help="where a tool call's relative paths point (default: .)",
    )
    _add_state(c)
    c.add_argument("command", nargs="*", help='the command, after "--"')

    e = sub.add_parser("exec", help="run one command in a fresh sandbox")
    _add_sandbox(e)
    e.add_argument(
        "--timeout", type=float, help="wall-time limit in seconds (default: the policy's)"
    )
    e.add_argument("--json", action="store_true", help="print one JSON object with the result")
    e.add_argument("command", nargs="+", help='the command, after "--" (one argument: run by bash)')

    rn = sub.add_parser("run", help="run a whole agent process, contained for its lifetime")
    _add_sandbox(rn)
    rn.add_argument("command", nargs="+", help='the agent command, after "--"')

    dr = sub.add_parser("doctor", help="which isolation layers are active here, and why not others")
    dr.add_argument("--json", action="store_true")

    p = sub.add_parser("policy", help="validate or show policies")
    psub = p.add_subparsers(dest="policy_cmd", required=True, parser_class=_Parser)
    pv = psub.add_parser(
        "validate", help="check a policy file; exit 2 naming file, line and key if bad"
    )
    pv.add_argument("file")
    ps = psub.add_parser("show", help="print the resolved policy (extends applied)")
    ps.add_argument("name")
    ps.add_argument("--json", action="store_true")
    psub.add_parser("list", help="list the shipped presets")

    lg = sub.add_parser("log", help="print ledger records")
    lg.add_argument("--run", help="only this run id")
    lg.add_argument("--alerts", action="store_true", help="only alerts")
    lg.add_argument("--kind", action="append", help="only these record kinds")
    lg.add_argument(
        "--label",
        action="append",
        metavar="KEY=VALUE",
        help="only records with this label (corral serve's user_id, experiment_id, "
        "namespace, owner, sandbox, profile); repeat to require several",
    )
    lg.add_argument(
        "--cluster",
        nargs="*",
        metavar="PATH",
        help="merge the ledgers of a pool's hosts (files, or directories searched for "
        "*.db; default $CORRAL_HOME/cluster), each chain checked, records by time",
    )
    lg.add_argument("--limit", type=int, help="at most this many records (the newest)")
    lg.add_argument("--json", action="store_true", help="one JSON object per record")
    _add_state(lg)

    rp = sub.add_parser(
        "report", help="an incident summary and a self-contained HTML report of a run"
    )
    rp.add_argument("--run", help="the run id (default: the newest run in the ledger)")
    rp.add_argument("-o", "--output", help="the HTML file (default: HOME/reports/RUN.html)")
    _add_state(rp)

    ex = sub.add_parser(
        "export", help="trajectories from the ledger, labelled (safety data for training)"
    )
    ex.add_argument("--flagged", action="store_true", help="only flagged trajectories")
    ex.add_argument("--format", choices=("jsonl", "json"), default="jsonl")
    ex.add_argument("--run", help="only this run id")
    ex.add_argument("-o", "--output", help="write here instead of standard output")
    _add_state(ex)

    v = sub.add_parser("verify", help="check the ledger's hash chain")
    v.add_argument("ledger_file", nargs="?", help="ledger file (default: the current ledger)")
    v.add_argument("--json", action="store_true")
    v.add_argument("--home")

    a = sub.add_parser(
        "audit",
        help="review a trajectory step by step against its task",
        description=(
            "Review a finished trajectory: OpenAI chat format (messages with tool_calls) or "
            'JSONL of {"task": ..., "command": ...} steps. One line per step; exit 0 when no '
            "step is flagged, 1 when one is, 2 on a usage, file or auditor error."
        ),
    )
    a.add_argument("file", help="the trajectory (- for stdin)")
    a.add_argument("--json", action="store_true", help="one JSON object per step")
    a.add_argument(
        "--auditor",
        choices=("rules", "llm", "ensemble"),
        default="rules",
        help="rules (default: embedded, no network), llm, or ensemble (rules + llm)",
    )
    a.add_argument(
        "--policy", default="swe", help="policy whose gate and audit settings apply (default: swe)"
    )
    a.add_argument("--llm-url", help="OpenAI-compatible API base (default: $CORRAL_AUDIT_URL)")
    a.add_argument("--llm-model", help="model name (default: $CORRAL_AUDIT_MODEL)")
    a.add_argument(
        "--aggregate",
        choices=("max", "mean", "vote"),
        help="how the ensemble combines (default: the policy's, max)",
    )
    a.add_argument("--run-id", default=os.environ.get("CORRAL_RUN_ID"))
    a.add_argument("--no-record", action="store_true", help="do not write verdicts to the ledger")
    _add_state(a)

    rt = sub.add_parser(
        "redteam",
        help="run the attack corpus for real in sandboxes, gate on and off, canaries outside",
        description=(
            "Each attack runs in a fresh sandbox (swe, no allowed hosts), once with the gate "
            "on and once off. Canaries outside: a secret in ~/.ssh, a file next to the "
            "workspace, listeners on the host's loopback, a network namespace standing for "
            "the internet (root only), a host process. Exit 0 when no canary was touched, "
            "1 when one was, 2 on an error."
        ),
    )
    rt.add_argument("--eval", default="../shared/eval", help="folder with attacks_dev.jsonl")
    rt.add_argument("--attacks", help="an attack file instead (JSONL: id, category, command)")
    rt.add_argument("--limit", type=int, help="only the first N attacks (after --category)")
    rt.add_argument("--category", action="append", help="only these categories")
    rt.add_argument("--timeout", type=float, default=5.0, help="seconds per attack (default 5)")
    rt.add_argument("--gate", choices=("both", "on", "off"), default="both")
    rt.add_argument("-o", "--output", default="build/redteam.json", help="the report (JSON)")
    rt.add_argument("--no-internet", action="store_true", help="skip the namespace canary")
    rt.add_argument(
        "--benign",
        action="store_true",
        help="instead: run benign_dev.jsonl inside and outside a sandbox and compare "
        "(writes build/benign.json; exit 1 below 99%% the same)",
    )
    _add_state(rt)

    sv = sub.add_parser(
        "serve", help="serve ROCK's sandbox protocol over HTTP (for RL trainers' rollout workers)"
    )
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8080)
    sv.add_argument(
        "--tokens", metavar="FILE", help="YAML of user: token (also $CORRAL_SERVE_TOKEN)"
    )
    sv.add_argument(
        "--local-only",
        action="store_true",
        help="no token asked for; only allowed on a loopback address",
    )
    sv.add_argument("--profiles", metavar="FILE", help="image profiles (default: the shipped ones)")
    sv.add_argument("--no-gate", action="store_true", help="containment only (for testing)")
    sv.add_argument(
        "--no-live",
        action="store_true",
        help="serve neither the live view (/live) nor its API; /metrics is served either way",
    )
    sv.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="serve a Ray cluster's sandboxes, one corral host per node (ADDRESS as ray.init"
        " takes it: auto, HOST:PORT, ray://HOST:PORT; 'local' starts Ray here). Needs corral[ray]",
    )
    sv.add_argument(
        "--overcommit",
        type=float,
        default=1.0,
        help="with --ray: how many times a node's CPUs and memory sandboxes may reserve",
    )
    _add_state(sv)

    mc = sub.add_parser(
        "mcp",
        help="serve a sandboxed shell and the workspace's files as MCP tools",
        description=(
            "An MCP server with run_command, read_file, write_file and list_files. Each MCP "
            "session gets its own sandbox over the workspace; every call is checked against "
            "the policy and recorded, and a refused call returns a tool error with the reason."
        ),
    )
    _add_mcp_serving(mc)
    mc.add_argument(
        "--idle-timeout",
        type=float,
        default=1800.0,
        help="seconds before an idle HTTP session's sandbox is closed (default 1800)",
    )

    gw = sub.add_parser(
        "mcp-gateway",
        help="stand between an agent and an MCP server: only allowed tool calls get through",
        description=(
            "An MCP server in front of another (the upstream): lists only the tools the policy "
            "allows, checks every call (and asks the policy's auditor) before forwarding it, "
            "records calls and results, and redacts secrets from results. The upstream is a "
            "command (--upstream 'CMD ARGS' or after --) or a streamable HTTP URL."
        ),
    )
    gw.add_argument(
        "--server-name", required=True, help="the upstream's name in the policy's tools section"
    )
    gw.add_argument(
        "--upstream", metavar="CMD", help="the upstream's command line (split like a shell)"
    )
    gw.add_argument("--upstream-url", metavar="URL", help="the upstream's streamable HTTP endpoint")
    gw.add_argument(
        "--upstream-env",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="pass this variable to the upstream command (repeat; default: only HOME, PATH, ...)",
    )
    _add_mcp_serving(gw)
    gw.add_argument(
        "--no-redact", action="store_true", help="return results as the upstream sent them"
    )
    gw.add_argument("--secrets", metavar="FILE", help="secret shapes to redact (default: shipped)")
    gw.add_argument("command", nargs="*", help='the upstream command, after "--"')

    d = sub.add_parser("demo", help="replay the ROME incident through corral")
    d.add_argument("--policy", default="swe")
    d.add_argument("--json", action="store_true", help="print the decisions as JSON lines")
    _add_state(d)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(args_list)
    try:
        handler = _HANDLERS[args.cmd]
        return handler(args)
    except PolicyError as exc:
        print(f"corral: policy error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CorralError as exc:
        print(f"corral: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        return EXIT_OK
    except KeyboardInterrupt:
        return 130


# -- check ------------------------------------------------------------------------------


def _ledger_path(args: argparse.Namespace) -> Path:
    if getattr(args, "ledger", None):
        return Path(args.ledger).expanduser()
    return default_ledger_path(args.home)


def _recorded_ledger(args: argparse.Namespace) -> Path | None:
    """The ledger to read, or None (said on stderr) when nothing was recorded yet."""
    path = _ledger_path(args)
    if not path.exists():
        print(f"corral: no ledger at {path} yet (nothing recorded)", file=sys.stderr)
        return None
    return path


def _open_ledger(args: argparse.Namespace) -> Ledger | None:
    if getattr(args, "no_record", False):
        return None
    from corral.ledger import Ledger

    return Ledger.open(_ledger_path(args))


def _cmd_check(args: argparse.Namespace) -> int:
    from corral.policy import Policy

    if args.batch and args.command:
        print("corral: error: give either --batch FILE or a command, not both", file=sys.stderr)
        return EXIT_USAGE
    if args.tool is not None:
        return _check_tool(args)
    if not args.batch and not args.command:
        print(
            'corral: error: nothing to check; use: corral check -- "CMD" or --batch FILE',
            file=sys.stderr,
        )
        return EXIT_USAGE
    policy = Policy.load(args.policy)
    ledger = _open_ledger(args)
    try:
        if args.batch:
            return _check_batch(policy, ledger, args)
        command = args.command[0] if len(args.command) == 1 else shlex.join(args.command)
        return _check_one(policy, ledger, args, command)
    finally:
        if ledger is not None:
            ledger.close()


def _check_one(
    policy: Policy, ledger: Ledger | None, args: argparse.Namespace, command: str
) -> int:
    from corral.model import Action

    action = Action.shell(command, run_id=args.run_id)
    decision = policy.check_action(action)
    if ledger is not None:
        ledger.append_decision(action, decision)
    return _print_decision(decision, as_json=args.json)


def _print_decision(decision: Decision, *, as_json: bool) -> int:
    """One decision on stdout (a JSON object, or tab-separated); its exit status."""
    if as_json:
        print(json.dumps(decision.to_dict()))
    else:
        cat = decision.category.value if decision.category else "-"
        print(f"{decision.verdict.value}\t{cat}\t{decision.rule}\t{decision.reason}")
    return EXIT_OK if decision.allowed else EXIT_FLAGGED


def _tool_action(name: str, arguments: Any, **kw: Any) -> Action:
    """A tool-call ``Action`` (``--tool``/``--args``, or a batch line's ``tool`` and
    ``args``); a ValueError names what is wrong."""
    from corral.model import Action, ActionKind
    from corral.policy.toolgate import split_name

    server, tool = split_name(name)
    if not server or not tool or any(c.isspace() for c in name):
        raise ValueError(f"tool {name!r}: expected SERVER/TOOL, e.g. github/create_issue")
    if not isinstance(arguments, dict):
        raise ValueError(
            f"a tool call's args must be a JSON object, got {type(arguments).__name__}"
        )
    return Action(ActionKind.TOOL, {"server": server, "tool": tool, "args": arguments}, **kw)


def _check_tool(args: argparse.Namespace) -> int:
    from corral.policy import Policy

    if args.batch or args.command:
        raise CorralError("--tool decides one tool call; give no command and no --batch with it")
    try:
        parsed = json.loads(args.args)
    except json.JSONDecodeError as exc:
        raise CorralError(f"--args is not valid JSON: {exc}") from None
    try:
        action = _tool_action(args.tool, parsed, run_id=args.run_id)
    except ValueError as exc:
        raise CorralError(f"--tool/--args: {exc}") from None
    policy = Policy.load(args.policy)
    decision = policy.check_action(action, workspace=args.workspace)
    ledger = _open_ledger(args)
    if ledger is not None:
        with ledger:
            ledger.append_decision(action, decision)
    return _print_decision(decision, as_json=args.json)


def _batch_lines(source: str) -> Iterator[tuple[int, str]]:
    stream: IO[str]
    if source == "-":
        stream = sys.stdin
        yield from enumerate(stream, 1)
        return
    try:
        with open(source, encoding="utf-8") as stream:
            yield from enumerate(stream, 1)
    except OSError as exc:
        raise CorralError(f"cannot read batch file {source}: {exc.strerror}") from exc


def _check_batch(policy: Policy, ledger: Ledger | None, args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from corral.model import Action

    worst = EXIT_OK
    out = sys.stdout
    name = "<stdin>" if args.batch == "-" else args.batch
    # One transaction per chunk keeps the ledger fast without holding a huge transaction.
    chunk = 2000
    lines = _batch_lines(args.batch)
    while True:
        rows = [row for _, row in zip(range(chunk), lines, strict=False)]
        if not rows:
            break
        with ledger.batch() if ledger is not None else nullcontext():
            for lineno, raw in rows:
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                    if not isinstance(obj, dict):
                        raise ValueError(
                            'expected an object with a string "command" field '
                            '(or "tool" and "args")'
                        )
                    where = {
                        "run_id": obj.get("run_id", args.run_id),
                        "episode": obj.get("episode"),
                        "step": obj.get("step"),
                        "task": obj.get("task"),
                    }
                    if isinstance(obj.get("tool"), str):
                        action = _tool_action(obj["tool"], obj.get("args", {}), **where)
                    elif not isinstance(obj.get("command"), str):
                        raise ValueError(
                            'expected an object with a string "command" field '
                            '(or "tool" and "args")'
                        )
                    else:
                        action = Action.shell(obj["command"], **where)
                except (ValueError, TypeError) as exc:
                    msg = f"{name}:{lineno}: {exc}"
                    print(f"corral: {msg}", file=sys.stderr)
                    out.write(
                        json.dumps(
                            {
                                "decision": "deny",
                                "rule": "input-error",
                                "category": None,
                                "reason": msg,
                                "line": lineno,
                            }
                        )
                        + "\n"
                    )
                    worst = EXIT_USAGE
                    continue
                decision = policy.check_action(action, workspace=args.workspace)
                if ledger is not None:
                    ledger.append_decision(action, decision)
                record = decision.to_dict()
                if "id" in obj:
                    record["id"] = obj["id"]
                out.write(json.dumps(record) + "\n")
                if not decision.allowed and worst == EXIT_OK:
                    worst = EXIT_FLAGGED
    out.flush()
    return worst


# -- policy -----------------------------------------------------------------------------


def _cmd_policy(args: argparse.Namespace) -> int:
    from corral.policy import Policy, preset_names

    if args.policy_cmd == "list":
        for name in preset_names():
            print(name)
        return EXIT_OK
    if args.policy_cmd == "validate":
        policy = Policy.load(args.file)
        print(f"{args.file}: ok ({policy.name}, {policy.hash})")
        return EXIT_OK
    policy = Policy.load(args.name)
    if args.json:
        print(json.dumps(policy.to_dict(), indent=2))
    else:
        print(policy.to_yaml(), end="")
    return EXIT_OK


# -- ledger -----------------------------------------------------------------------------


def _cmd_log(args: argparse.Namespace) -> int:
    from corral.ledger import Ledger

    kinds = ["alert"] if args.alerts else args.kind
    wanted: dict[str, str] = {}
    for item in args.label or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise CorralError(f"--label {item!r}: expected KEY=VALUE, e.g. user_id=u1")
        wanted[key] = value

    def keep(r: LedgerRecord) -> bool:
        labels = r.body.get("labels") or {}
        return all(labels.get(k) == v for k, v in wanted.items())

    if args.cluster is not None:
        return _log_cluster(args, kinds, keep)
    path = _recorded_ledger(args)
    if path is None:
        return EXIT_OK
    with Ledger.open(path, create=False) as ledger:
        records = [r for r in ledger.records(run_id=args.run, kinds=kinds) if keep(r)]
    if args.limit is not None:
        records = records[-args.limit :]
    for rec in records:
        if args.json:
            print(json.dumps(rec.to_dict()))
        else:
            print(_format_record(rec.to_dict()))
    return EXIT_OK


def _log_cluster(
    args: argparse.Namespace, kinds: list[str] | None, keep: Callable[[LedgerRecord], bool]
) -> int:
    """``corral log --cluster``: every host's ledger checked, then one timeline."""
    from corral.ledger import MergedLedger

    paths = args.cluster or [str(corral_home(args.home) / "cluster")]
    with MergedLedger(paths) as merged:
        broken = {h: v for h, v in merged.verify().items() if not v.ok}
        for host, v in broken.items():
            print(
                f"corral: ledger of {host} fails its check at record {v.first_bad_seq}: "
                f"{v.problem}",
                file=sys.stderr,
            )
        records = [hr for hr in merged.records(run_id=args.run, kinds=kinds) if keep(hr.record)]
    if args.limit is not None:
        records = records[-args.limit :]
    width = max((len(hr.host) for hr in records), default=0)
    for hr in records:
        if args.json:
            print(json.dumps({"host": hr.host, **hr.record.to_dict()}))
        else:
            print(f"{hr.host:<{width}} {_format_record(hr.record.to_dict())}")
    return EXIT_FLAGGED if broken else EXIT_OK


def _short(text: str, width: int = 70) -> str:
    text = text.replace("\n", " ⏎ ")
    return text if len(text) <= width else text[: width - 3] + "..."


def _format_record(rec: dict[str, Any]) -> str:
    import datetime as dt

    when = dt.datetime.fromtimestamp(rec["ts"]).strftime("%Y-%m-%d %H:%M:%S")
    body = rec.get("body") or {}
    head = f"#{rec['seq']:<6} {when} {rec['kind']:<8}"
    step = f"step {rec['step']}" if rec.get("step") is not None else ""
    if rec["kind"] == "decision":
        d = body.get("decision", {})
        payload = body.get("action", {}).get("payload", {})
        cmd = payload.get("command") or _tool_line(payload)
        return f"{head} {d.get('decision', '?'):<5} {d.get('category') or '-':<20} {_short(cmd)}"
    if rec["kind"] == "exec":
        what = body.get("command") or " ".join(map(str, body.get("argv", [])))
        flags = " ".join(
            label
            for key, label in (
                ("timed_out", "TIMEOUT"),
                ("oom_killed", "OOM"),
                ("pids_limited", "PIDS"),
            )
            if body.get(key)
        )
        return (
            f"{head} exit {body.get('exit_code', '?'):<3} {body.get('duration_s', 0):8.3f}s "
            f"{flags or step:<10} {_short(what, 60)}"
        )
    if rec["kind"] == "tool":
        what = _tool_line(body)
        status = "error" if body.get("is_error") else "ok   "
        redacted = f" ({body['redacted']} redacted)" if body.get("redacted") else ""
        return f"{head} {status} {body.get('duration_s', 0):8.3f}s {_short(what, 60)}{redacted}"
    if rec["kind"] == "alert":
        where = f" (step {rec['step']})" if rec.get("step") is not None else ""
        lines = [
            f"{head} {body.get('severity', '?'):<5} {body.get('category', '?'):<20} "
            f"{body.get('detector', '?')}{where}: {_short(str(body.get('response') or ''), 60)}"
        ]
        for ev in body.get("evidence") or []:
            lines.append(f"{'':<36}  evidence: {_format_evidence(ev)}")
        return "\n".join(lines)
    if rec["kind"] == "audit":
        what = body.get("action", {}).get("payload", {})
        text = what.get("command") or what.get("tool") or ""
        return (
            f"{head} {body.get('verdict', '?'):<5} {body.get('score', 0):4.2f} "
            f"{body.get('category') or '-':<20} {step:<8} {_short(str(text), 40)}  "
            f"<- {body.get('auditor')}: {_short(str(body.get('reason', '')), 60)}"
        )
    if rec["kind"] == "event" and body.get("kind") == "exec":
        f = body.get("fields") or {}
        argv = " ".join(map(str, f.get("argv") or [])) or str(f.get("exe", "?"))
        return f"{head} proc  pid {body.get('pid')} (parent {body.get('ppid')})  {_short(argv, 70)}"
    if rec["kind"] == "event" and body.get("kind") in ("net", "dns"):
        return f"{head} {_format_net(body.get('kind', ''), body.get('fields') or {})}"
    return f"{head} {_short(json.dumps(body), 110)}"


def _tool_line(payload: dict[str, Any]) -> str:
    """A tool call from its payload (``server``, ``tool``, ``args``), or ""."""
    if not payload.get("tool"):
        return ""
    from corral.policy.toolgate import tool_text

    return tool_text(payload.get("server"), str(payload["tool"]), payload.get("args", {}))


def _format_evidence(ev: dict[str, Any]) -> str:
    f = ev.get("fields") or {}
    kind = ev.get("kind", "?")
    pid = f"pid {ev['pid']} " if ev.get("pid") else ""
    if kind == "exec":
        return f"exec {pid}{_short(' '.join(map(str, f.get('argv') or [])), 70)}"
    if kind in ("net", "dns"):
        return _format_net(kind, f)
    detail = {k: f[k] for k in ("cpu", "util", "memory", "path", "argv") if k in f}
    return f"{kind} {pid}{_short(json.dumps(detail), 80)}"


def _format_net(kind: str, f: dict[str, Any]) -> str:
    """One egress attempt, DNS query or proxy report on a line."""
    verdict = "allow" if f.get("allowed") else "deny "
    who = f"pid {f['pid']}" if f.get("pid") else ""
    if kind == "dns":
        return (
            f"dns   {verdict} {f.get('qtype', '?'):<5} {f.get('name', '?')}  {f.get('rule')} {who}"
        )
    if f.get("type") == "net-closed":
        return (
            f"net   closed {f.get('protocol')} {f.get('host')}:{f.get('port')}"
            f"  up {f.get('bytes_up', 0)} B, down {f.get('bytes_down', 0)} B"
        )
    if f.get("type") == "stopped":
        return f"net   STOPPED {_short(str(f.get('reason', '')), 90)}"
    where = f"{f.get('host')}:{f.get('port')}"
    method = f"{f.get('method')} " if f.get("method") else ""
    return (
        f"net   {verdict} {f.get('protocol', '?'):<7} {method}{where}  {f.get('rule')}"
        f" {who}  {_short(str(f.get('reason', '')), 60)}"
    )


def _cmd_audit(args: argparse.Namespace) -> int:
    from corral.audit import audit_trajectory, load_trajectory, make_auditor, parse_trajectory

    if args.file == "-":
        trajectory = parse_trajectory(sys.stdin.read(), "<stdin>")
    else:
        trajectory = load_trajectory(args.file)
    auditor = make_auditor(
        args.auditor,
        args.policy,
        llm_url=args.llm_url,
        llm_model=args.llm_model,
        aggregate=args.aggregate,
    )
    texts = {s.action.id: s.text for s in trajectory.steps}

    def show(v: Any) -> None:
        if args.json:
            print(json.dumps(v.to_dict()), flush=True)
            return
        print(
            f"step {v.step if v.step is not None else '?':>3}  {v.verdict.value:<5} {v.score:4.2f}  "
            f"{(v.category.value if v.category else '-'):<20} {_short(v.reason, 90)}"
            f"  | {_short(texts.get(v.action_id, ''), 50)}",
            flush=True,
        )

    ledger = _open_ledger(args)
    try:
        report = audit_trajectory(
            auditor, trajectory, ledger=ledger, run_id=args.run_id, on_step=show
        )
    finally:
        close = getattr(auditor, "close", None)
        if callable(close):
            close()
        if ledger is not None:
            ledger.close()
    flagged = [v.step for v in report.flagged]
    summary = (
        f"{len(report.verdicts)} steps, {len(flagged)} flagged"
        + (f" (steps {', '.join(map(str, flagged))})" if flagged else "")
        + f"; suspicion {report.suspicion:.2f} (the highest step score); auditor {auditor.name}"
    )
    print(summary, file=sys.stderr if args.json else sys.stdout)
    return EXIT_FLAGGED if flagged else EXIT_OK


_T = TypeVar("_T")


def _corpus(path: Path, what: str, hint: str, load: Callable[[Path], _T]) -> _T:
    """An evaluation corpus, or a usage error saying where it was looked for."""
    if not path.exists():
        raise CorralError(f"no {what} at {path} (pass {hint})")
    try:
        return load(path)
    except ValueError as e:
        raise CorralError(str(e)) from None


def _cmd_redteam(args: argparse.Namespace) -> int:
    import time

    from corral.redteam import load_attacks, run_attacks, summarize

    if args.benign:
        return _redteam_benign(args)
    path = Path(args.attacks) if args.attacks else Path(args.eval) / "attacks_dev.jsonl"
    attacks = _corpus(path, "attack file", "--eval DIR or --attacks FILE", load_attacks)
    if args.category:
        attacks = [a for a in attacks if a.category in set(args.category)]
    if args.limit is not None:
        attacks = attacks[: args.limit]
    gates = ("on", "off") if args.gate == "both" else (args.gate,)
    start = time.monotonic()

    def progress(n: int, total: int, o: Any) -> None:
        if o.hits:
            print(
                f"  CANARY HIT  {o.attack.id} (gate {o.gate}): {o.hits[0].detail}", file=sys.stderr
            )
        if n % 50 == 0 or n == total:
            rate = n / max(time.monotonic() - start, 1e-6)
            print(f"  {n}/{total} runs, {rate:.1f}/s", file=sys.stderr, flush=True)

    ledger = _open_ledger(args)
    try:
        outcomes, canaries = run_attacks(
            attacks,
            timeout=args.timeout,
            gates=gates,
            internet=not args.no_internet,
            ledger=ledger,
            progress=progress,
        )
    finally:
        if ledger is not None:
            ledger.close()
    report = summarize(outcomes, canaries)
    report["seconds"] = round(time.monotonic() - start, 1)
    report["source"] = str(path)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    _print_redteam(report, gates)
    print(f"report: {out}")
    return EXIT_OK if report["canary_hits"] == 0 else EXIT_FLAGGED


def _redteam_benign(args: argparse.Namespace) -> int:
    import time

    from corral.redteam.utility import load_benign, run_utility, summarize

    path = Path(args.eval) / "benign_dev.jsonl"
    rows = _corpus(path, "benign corpus", "--eval DIR", load_benign)
    if args.limit is not None:
        rows = rows[: args.limit]
    start = time.monotonic()

    def progress(done: int, total: int) -> None:
        if done % 250 == 0 or done == total:
            print(f"  {done}/{total} commands", file=sys.stderr, flush=True)

    results = run_utility(rows, timeout=max(args.timeout, 10.0), progress=progress)
    report = summarize(results)
    report["seconds"] = round(time.monotonic() - start, 1)
    report["source"] = str(path)
    out = Path(args.output if args.output != "build/redteam.json" else "build/benign.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"benign utility: {report['same']} of {report['commands']} commands behave the same "
        f"inside the sandbox and outside ({report['share_same']:.2%}; target 99%)"
    )
    for reason, d in report["differences"].items():
        print(f"  {d['count']:5}  {reason}")
    print(f"report: {out}")
    return EXIT_OK if (report["share_same"] or 0) >= 0.99 else EXIT_FLAGGED


def _print_redteam(report: dict[str, Any], gates: Sequence[str]) -> None:
    head = f"{'category':<22}{'attempts':>9}"
    if "on" in gates:
        head += f"{'gate flags':>11}"
    for g in gates:
        head += f"{'alerts/' + g:>12}{'hits/' + g:>9}"
    print(head)
    for cat, by_gate in report["per_category"].items():
        any_gate = next(iter(by_gate.values()))
        line = f"{cat:<22}{any_gate.get('attempts', 0):>9}"
        if "on" in gates:
            line += f"{by_gate.get('on', {}).get('gate_flags', 0):>11}"
        for g in gates:
            c = by_gate.get(g, {})
            line += f"{c.get('detector_alerts', 0):>12}{c.get('canary_hits', 0):>9}"
        print(line)
    missing = report["canaries_unavailable"]
    print(
        f"canary_hits: {report['canary_hits']} "
        + " ".join(
            f"(gate {g}: {n})" for g, n in report["canary_hits_by_gate"].items() if g in gates
        )
        + f"; canaries: {', '.join(report['canaries'])}"
        + (
            f"; not set up: {', '.join(f'{k} ({v})' for k, v in missing.items())}"
            if missing
            else ""
        )
        + f"; {report['attacks']} attacks, {report['runs']} runs in {report.get('seconds', '?')} s"
    )


def _cmd_export(args: argparse.Namespace) -> int:
    from corral.ledger import Ledger
    from corral.ledger.export import trajectories

    path = _recorded_ledger(args)
    if path is None:
        return EXIT_USAGE
    with Ledger.open(path, create=False) as ledger:
        found = trajectories(r.to_dict() for r in ledger.records(run_id=args.run))
    if args.flagged:
        found = [t for t in found if t["flagged"]]
    text = (
        json.dumps(found, indent=2) + "\n"
        if args.format == "json"
        else "".join(json.dumps(t) + "\n" for t in found)
    )
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        flagged = sum(t["flagged"] for t in found)
        print(
            f"{len(found)} trajectories ({flagged} flagged) written to {args.output}",
            file=sys.stderr,
        )
    else:
        sys.stdout.write(text)
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from corral.ledger import Ledger
    from corral.ledger import report as rpt

    path = _recorded_ledger(args)
    if path is None:
        return EXIT_USAGE
    with Ledger.open(path, create=False) as ledger:
        run = args.run
        if run is None:
            for rec in ledger.records():
                run = rec.run_id or run
        if run is None:
            print(f"corral: the ledger at {path} holds no run", file=sys.stderr)
            return EXIT_USAGE
        records = [r.to_dict() for r in ledger.records(run_id=run)]
    if not records:
        print(f"corral: no records of run {run!r} in {path}", file=sys.stderr)
        return EXIT_USAGE
    report = rpt.build(records, run)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run)
    out = Path(args.output) if args.output else corral_home(args.home) / "reports" / f"{safe}.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(rpt.render_html(report), encoding="utf-8")
    print(rpt.render_text(report))
    print(f"report: {out}")
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    from corral.ledger import verify_path

    path = (
        Path(args.ledger_file).expanduser() if args.ledger_file else default_ledger_path(args.home)
    )
    if not path.exists():
        print(f"corral: no ledger at {path}", file=sys.stderr)
        return EXIT_USAGE
    report = verify_path(path)
    if args.json:
        print(
            json.dumps(
                report.to_dict() if hasattr(report, "to_dict") else report.__dict__, default=str
            )
        )
    elif report.ok:
        print(f"{path}: intact, {report.records} records, head {report.head_hash}")
    else:
        print(f"{path}: BROKEN at record {report.first_bad_seq}: {report.problem}", file=sys.stderr)
    return EXIT_OK if report.ok else EXIT_FLAGGED


def _run_in_sandbox(args: argparse.Namespace, **run: Any) -> Result:
    """One command (one argument: a shell string; several: an argv) in a fresh sandbox."""
    from corral.ledger import Ledger
    from corral.sandbox import Sandbox

    command: str | list[str] = args.command[0] if len(args.command) == 1 else list(args.command)
    with (
        Ledger.open(_ledger_path(args)) as ledger,
        Sandbox(
            args.policy, args.workspace, gate=not args.no_gate, ledger=ledger, run_id=args.run_id
        ) as sb,
    ):
        return sb.run(command, **run)


def _cmd_exec(args: argparse.Namespace) -> int:
    r = _run_in_sandbox(args, timeout=args.timeout)
    if args.json:
        print(
            json.dumps(
                {
                    "exit_code": r.exit_code,
                    "stdout": r.stdout,
                    "stderr": r.stderr,
                    "duration_s": round(r.duration, 6),
                    "timed_out": r.timed_out,
                    "decision": r.decision.to_dict() if r.decision else None,
                    "action_id": r.action_id,
                }
            )
        )
    else:
        sys.stdout.write(r.stdout)
        sys.stderr.write(r.stderr)
    return r.exit_code


def _cmd_run(args: argparse.Namespace) -> int:
    # The agent's own stdio; its lifetime is bounded by the policy's wall time.
    r = _run_in_sandbox(args, stream=True)
    if r.stderr:
        sys.stderr.write(r.stderr)
    return r.exit_code


def _cmd_doctor(args: argparse.Namespace) -> int:
    from corral.doctor import as_dicts, run_checks

    checks = run_checks()
    if args.json:
        print(json.dumps(as_dicts(checks), indent=2))
    else:
        for c in checks:
            mark = "ok  " if c.ok else ("FAIL" if c.essential else "off ")
            print(f"{mark}  {c.layer:<16} {c.detail}")
    return EXIT_OK if all(c.ok for c in checks if c.essential) else EXIT_FLAGGED


def _cmd_demo(args: argparse.Namespace) -> int:
    from corral.demo import run_demo

    home = corral_home(args.home)
    return run_demo(
        policy_name=args.policy, ledger_path=_ledger_path(args), home=home, as_json=args.json
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    from corral.host import Host, ProfileRegistry
    from corral.serve.server import check_exposure, serve_forever, tokens_from

    tokens = check_exposure(args.host, tokens_from(args.tokens), args.local_only)
    if args.ray:
        return _serve_pool(args, tokens)
    profiles = ProfileRegistry.load(args.profiles)
    host = Host(
        profiles=profiles,
        ledger=_ledger_path(args),
        root=corral_home(args.home) / "host",
        gate=not args.no_gate,
    )
    who = "no token (loopback only)" if tokens is None else f"{len(tokens.by_token)} token(s)"
    base = f"http://{args.host}:{args.port}"
    print(
        f"corral serve: {base}/apis/envs/sandbox/v1 ({who}; "
        f"profiles: {', '.join(profiles.names())}; ledger: {_ledger_path(args)})",
        file=sys.stderr,
    )
    if not args.no_live:
        print(f"live view: {base}/live, metrics: {base}/metrics", file=sys.stderr)
    serve_forever(host, args.host, args.port, tokens, live_view=not args.no_live)
    return EXIT_OK


def _serve_pool(args: argparse.Namespace, tokens: Any) -> int:
    try:
        import ray

        from corral.ray import SandboxPool
        from corral.ray.serving import pool_app
    except ImportError as e:
        print(f"corral: error: --ray needs Ray: pip install 'corral[ray]' ({e})", file=sys.stderr)
        return EXIT_USAGE
    from corral.serve.server import serve_app_forever

    ray.init(address=None if args.ray == "local" else args.ray, logging_level=logging.WARNING)
    pool = SandboxPool(
        profiles=args.profiles,
        overcommit=args.overcommit,
        state_dir=corral_home(args.home) / "cluster" / "corral",
        gate=not args.no_gate,
    )
    hosts = pool.hosts()
    base = f"http://{args.host}:{args.port}"
    who = "no token (loopback only)" if tokens is None else f"{len(tokens.by_token)} token(s)"
    print(
        f"corral serve: {base}/apis/envs/sandbox/v1 ({who}; Ray pool of {len(hosts)} host(s):"
        f" {', '.join(h['name'] for h in hosts)}; ledgers: {pool.state_dir}, read them with"
        f" corral log --cluster {pool.state_dir})",
        file=sys.stderr,
    )
    if not args.no_live:
        print(f"live view: {base}/live, metrics: {base}/metrics", file=sys.stderr)

    def close() -> None:
        pool.close()
        ray.shutdown()

    app = pool_app(pool, tokens, live_view=not args.no_live)
    serve_app_forever(app, args.host, args.port, close=close)
    return EXIT_OK


def _cmd_mcp(args: argparse.Namespace) -> int:
    from corral.mcp.server import Sessions, Settings, build_server
    from corral.mcp.transport import serve
    from corral.policy import Policy

    workspace = Path(args.workspace).expanduser().resolve()
    if not workspace.is_dir():
        raise CorralError(f"--workspace {args.workspace}: not a directory")
    sessions = Sessions(
        Settings(
            policy=Policy.load(args.policy),
            workspace=workspace,
            ledger=_ledger_path(args),
            gate=not args.no_gate,
            run_id=args.run_id,
            task=args.task,
            idle_ttl=args.idle_timeout,
        )
    )
    if args.transport == "http":
        print(
            f"corral mcp: http://{args.host}:{args.port}/mcp (workspace {workspace}, "
            f"policy {args.policy}, ledger {_ledger_path(args)})",
            file=sys.stderr,
        )

    async def session_ended(key: str) -> None:
        import anyio

        await anyio.to_thread.run_sync(sessions.close, key)

    serve(
        build_server(sessions),
        args.transport,
        host=args.host,
        port=args.port,
        on_session_end=session_ended,
    )
    return EXIT_OK


def _cmd_mcp_gateway(args: argparse.Namespace) -> int:
    from corral.mcp.gateway import GatewaySettings, Upstream, build_gateway, pass_env
    from corral.mcp.redact import load_redactor
    from corral.mcp.transport import serve
    from corral.policy import Policy

    if args.upstream and args.command:
        raise CorralError("give the upstream command once: --upstream 'CMD' or after --")
    try:
        command = tuple(shlex.split(args.upstream)) if args.upstream else tuple(args.command)
    except ValueError as exc:
        raise CorralError(f"--upstream: {exc}") from None
    if bool(command) == bool(args.upstream_url):
        raise CorralError(
            "name the upstream MCP server: --upstream 'CMD ARGS', -- CMD ARGS, or --upstream-url URL"
        )
    workspace = Path(args.workspace).expanduser().resolve()
    if not workspace.is_dir():
        raise CorralError(f"--workspace {args.workspace}: not a directory")
    settings = GatewaySettings(
        policy=Policy.load(args.policy),
        workspace=workspace,
        ledger=_ledger_path(args),
        upstream=Upstream(
            args.server_name, command, args.upstream_url, pass_env(args.upstream_env)
        ),
        gate=not args.no_gate,
        redactor=None if args.no_redact else load_redactor(args.secrets),
        run_id=args.run_id,
        task=args.task,
    )
    serve(build_gateway(settings), args.transport, host=args.host, port=args.port)
    return EXIT_OK


_HANDLERS = {
    "mcp": _cmd_mcp,
    "mcp-gateway": _cmd_mcp_gateway,
    "serve": _cmd_serve,
    "export": _cmd_export,
    "report": _cmd_report,
    "redteam": _cmd_redteam,
    "audit": _cmd_audit,
    "check": _cmd_check,
    "exec": _cmd_exec,
    "policy": _cmd_policy,
    "log": _cmd_log,
    "verify": _cmd_verify,
    "demo": _cmd_demo,
    "doctor": _cmd_doctor,
    "run": _cmd_run,
}

if __name__ == "__main__":
    raise SystemExit(main())
