"""What an argv means beyond its first word: wrapped commands and shell script text.

``sudo -u root env FOO=1 nice -n 5 python x.py`` runs four programs; ``bash -lc 'x'``
runs a script given as a string. The gate must see all of them, so this module knows,
for each wrapper, which options consume a value and how many operands precede the
wrapped command. It works on plain argv tuples; the tree walking lives in ``shell``.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

SHELLS = frozenset(
    {"sh", "bash", "dash", "zsh", "ksh", "ash", "mksh", "pdksh", "yash", "posh", "rbash"}
)


@dataclass(frozen=True, slots=True)
class Wrapper:
    """How a wrapper program finds the command it runs."""

    takes_arg: frozenset[str] = frozenset()  # options that consume a value
    positional: int = 0  # operands before the command (timeout DURATION)
    assignments: bool = False  # NAME=value words may precede the command
    origin: str | None = None  # origin given to the wrapped command
    no_command: frozenset[str] = frozenset()  # options after which nothing is wrapped
    default: tuple[str, ...] = ()  # what runs when no command is given
    shell_opts: frozenset[str] = frozenset()  # options that start a shell when no command is given
    script_opts: frozenset[str] = frozenset()  # options whose value is a shell script string
    split_opts: frozenset[str] = (
        frozenset()
    )  # options whose value is split into the command (env -S)
    command_opts: frozenset[str] = (
        frozenset()
    )  # if set, a command is wrapped only with one of these
    wraps: bool = True  # False: operands are not a command (su USER)
    numeric: bool = False  # "-5" is an option (nice)


def _w(takes: str = "", **kw: object) -> Wrapper:
    for key in ("no_command", "shell_opts", "script_opts", "split_opts", "command_opts"):
        if isinstance(kw.get(key), str):
            kw[key] = frozenset(str(kw[key]).split())
    return Wrapper(takes_arg=frozenset(takes.split()), **kw)  # type: ignore[arg-type]


_SU_OPTS = (
    "-c --command --session-command -s --shell -g --group -G --supp-group "
    "-w --whitelist-environment"
)
_STRACE_OPTS = (
    "-e -o -p -s -u -E -a -b -I -O -P -S -U -X --output --attach --user --env "
    "--string-limit --trace --signal --status --summary-columns"
)

# Options are listed by name; a short option that takes a value may also be written glued
# to it ("-n5", "-I{}") and a long one with "=" ("--signal=KILL").
WRAPPERS: dict[str, Wrapper] = {
    "env": _w(
        "-u --unset -C --chdir -S --split-string", assignments=True, split_opts="-S --split-string"
    ),
    "nohup": _w(),
    "timeout": _w("-s --signal -k --kill-after", positional=1),
    "xargs": _w(
        "-I -n --max-args -P --max-procs -d --delimiter -a --arg-file -L --max-lines "
        "-s --max-chars -E --eof --process-slot-var",
        origin="xargs",
        default=("echo",),
    ),
    "sudo": _w(
        "-u --user -g --group -p --prompt -C --close-from -D --chdir -r --role "
        "-t --type -U --other-user -T --command-timeout -R --chroot",
        assignments=True,
        shell_opts="-s --shell -i --login",
        no_command="-l --list -v --validate -e --edit -K --remove-timestamp -V --version",
    ),
    "doas": _w("-u -C", shell_opts="-s", no_command="-C -L"),
    "setsid": _w(),
    "nice": _w("-n --adjustment", numeric=True),
    "ionice": _w(
        "-c --class -n --classdata -p --pid -P --pgid -u --uid",
        no_command="-p --pid -P --pgid -u --uid",
    ),
    "stdbuf": _w("-i -o -e --input --output --error"),
    "command": _w(no_command="-v -V"),
    "builtin": _w(),
    "exec": _w("-a"),
    "time": _w("-f --format -o --output"),
    "chroot": _w("--userspec --groups", positional=1, default=("sh", "-i")),
    "flock": _w(
        "-w --timeout --wait -E --conflict-exit-code -c --command",
        positional=1,
        script_opts="-c --command",
        no_command="-c --command",
    ),
    "unbuffer": _w(),
    "strace": _w(_STRACE_OPTS),
    "ltrace": _w("-e -o -p -s -u -a -A -D -F -l -n -x -L --output --library"),
    "taskset": _w(positional=1, no_command="-p --pid"),
    "chrt": _w(
        "-T --sched-runtime -P --sched-period -D --sched-deadline",
        positional=1,
        no_command="-p --pid",
    ),
    "busybox": _w(),
    "catchsegv": _w(),
    "faketime": _w(positional=1),
    "proxychains": _w("-f"),
    "proxychains4": _w("-f"),
    "torsocks": _w("-u -p -a -P --user --pass --address --port"),
    "tsocks": _w(),
    "systemd-run": _w(
        "-u --unit -p --property -E --setenv -M --machine -H --host "
        "--description --slice --uid --gid --nice --working-directory "
        "--on-active --on-boot --on-startup --on-unit-active --on-unit-inactive "
        "--on-calendar --timer-property --path-property --socket-property "
        "--service-type"
    ),
    "nsenter": _w("-t --target -S --setuid -G --setgid --wdns", default=("sh",)),
    "unshare": _w(
        "-S --setuid -G --setgid -R --root -w --wd --propagation --setgroups", default=("sh",)
    ),
    "sshpass": _w("-p -f -d -P"),
    "su": _w(_SU_OPTS, script_opts="-c --command --session-command", wraps=False),
    "runuser": _w(
        _SU_OPTS + " -u --user",
        script_opts="-c --command --session-command",
        command_opts="-u --user",
    ),
    "script": _w(
        "-c --command -E --echo -I --log-in -O --log-out -B --log-io -T "
        "--log-timing -m --logging-format",
        script_opts="-c --command",
        wraps=False,
    ),
}

_ASSIGN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
_FIND_EXEC = frozenset({"-exec", "-execdir", "-ok", "-okdir"})
_STDIN_FILES = frozenset({"-", "/dev/stdin", "/dev/fd/0", "/proc/self/fd/0"})
_SHELL_TAKES_ARG = frozenset({"-o", "+o", "-O", "+O", "--rcfile", "--init-file"})


def basename(word: str) -> str:
    return word.rstrip("/").rsplit("/", 1)[-1] if "/" in word else word


@dataclass(frozen=True, slots=True)
class Inner:
    """A command run by a wrapper. ``src[k]`` is the index in the wrapper's argv that
    ``argv[k]`` came from (-1 for words the wrapper implies, like sudo -s's shell)."""

    argv: tuple[str, ...]
    src: tuple[int, ...]
    origin: str | None = None


@dataclass(frozen=True, slots=True)
class Script:
    """Where a shell-like program takes its script from.

    kind "string": the words at ``idx`` joined by spaces (after dropping ``offset``
    characters of the first) are the script; "stdin": the script is read from standard
    input; "file": the file named by the word at ``idx[0]`` is run."""

    shell: str
    kind: str
    idx: tuple[int, ...] = ()
    offset: int = 0


def _scan(
    argv: tuple[str, ...], spec: Wrapper, *, permute: bool = False
) -> tuple[list[tuple[str, int, int]], int]:
    """Options of a wrapper as (name, value index, value offset) and where its command
    starts. The value index is -1 for options without a value. With ``permute``, options
    after operands count too, as GNU getopt reads them (``su - root -c CMD``)."""
    opts: list[tuple[str, int, int]] = []
    left = spec.positional
    i, n = 1, len(argv)
    while i < n:
        w = argv[i]
        if w == "--":
            i += 1 + left
            break
        if spec.assignments and _ASSIGN.match(w):
            i += 1
        elif w.startswith("--") and len(w) > 2:
            name, eq, _ = w.partition("=")
            if eq:
                opts.append((name, i, len(name) + 1))
            elif name in spec.takes_arg:
                opts.append((name, i + 1, 0))
                i += 1
            else:
                opts.append((name, -1, 0))
            i += 1
        elif w.startswith("-") and len(w) > 1 and not (spec.numeric and w[1:].isdigit()):
            for j in range(1, len(w)):
                name = "-" + w[j]
                if name in spec.takes_arg:
                    if j + 1 < len(w):
                        opts.append((name, i, j + 1))
                    else:
                        opts.append((name, i + 1, 0))
                        i += 1
                    break
                opts.append((name, -1, 0))
            i += 1
        elif spec.numeric and w.startswith("-"):
            i += 1
        elif left or permute:
            left = max(0, left - 1)
            i += 1
        else:
            break
    return opts, min(i, n)


def _split(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError:
        return text.split()


def unwrap(argv: tuple[str, ...]) -> list[Inner]:
    """Commands that the program ``argv`` runs with arguments of its own choosing."""
    prog = basename(argv[0]) if argv else ""
    if prog == "find":
        return _find_exec(argv)
    spec = WRAPPERS.get(prog)
    if spec is None or not spec.wraps:
        return []
    opts, start = _scan(argv, spec)
    names = {name for name, _, _ in opts}
    if names & spec.no_command or (spec.command_opts and not names & spec.command_opts):
        return []
    words = list(argv[start:])
    src = list(range(start, len(argv)))
    for name, vi, off in reversed(opts):
        if name in spec.split_opts and 0 <= vi < len(argv):
            parts = _split(argv[vi][off:])
            words[:0] = parts
            src[:0] = [vi] * len(parts)
    if not words:
        if names & spec.shell_opts:
            words, src = ["sh"], [-1]
        elif spec.default:
            words, src = list(spec.default), [-1] * len(spec.default)
        else:
            return []
    return [Inner(tuple(words), tuple(src), spec.origin)]


def _find_exec(argv: tuple[str, ...]) -> list[Inner]:
    out: list[Inner] = []
    i, n = 1, len(argv)
    while i < n:
        if argv[i] in _FIND_EXEC:
            j = i + 1
            while j < n and not (argv[j] == ";" or (argv[j] == "+" and argv[j - 1] == "{}")):
                j += 1
            if j > i + 1:
                out.append(Inner(argv[i + 1 : j], tuple(range(i + 1, j)), "find-exec"))
            i = j
        i += 1
    return out


def script(argv: tuple[str, ...]) -> Script | None:
    """Where ``argv``'s program reads shell code from, if it is a shell-like program."""
    if not argv:
        return None
    prog = basename(argv[0])
    if prog in SHELLS:
        return _shell(prog, argv)
    if prog == "eval":
        return Script("eval", "string", tuple(range(1, len(argv)))) if len(argv) > 1 else None
    if prog in ("source", "."):
        if len(argv) < 2:
            return None
        kind = "stdin" if argv[1] in _STDIN_FILES else "file"
        return Script("source", kind, (1,))
    if prog == "watch":
        _, start = _scan(argv, _WATCH)
        return Script("sh", "string", tuple(range(start, len(argv)))) if start < len(argv) else None
    spec = WRAPPERS.get(prog)
    if spec is None or not spec.script_opts:
        return None
    for name, vi, off in _scan(argv, spec, permute=True)[0]:
        if name in spec.script_opts and 0 <= vi < len(argv):
            return Script("sh", "string", (vi,), off)
    return None


_WATCH = _w("-n --interval -d --differences -q --equexit")


def _shell(prog: str, argv: tuple[str, ...]) -> Script | None:
    has_c = from_stdin = False
    i, n = 1, len(argv)
    while i < n:
        w = argv[i]
        if w in ("-", "--"):
            from_stdin = from_stdin or w == "-"
            i += 1
            break
        if w in _SHELL_TAKES_ARG:
            i += 2
        elif w.startswith("--"):
            i += 1
        elif w[:1] in "-+" and len(w) > 1:
            has_c = has_c or "c" in w
            from_stdin = from_stdin or "s" in w
            i += 1 + ("o" in w[1:] or "O" in w[1:])
        else:
            break
    if has_c:
        return Script(prog, "string", (i,)) if i < n else None
    if from_stdin or i >= n or argv[i] in _STDIN_FILES:
        return Script(prog, "stdin")
    return Script(prog, "file", (i,))
