"""decode: the text short pipelines print, recovered without running them."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.policy import decode
from corral.policy.decode import Step


def run(*stages: tuple[str, ...], stdin: str | None = None) -> decode.Recovered:
    steps = [Step(argv) for argv in stages]
    if stdin is not None:
        steps[0] = Step(stages[0], stdin=stdin)
    return decode.evaluate(steps)


ESCAPES = [
    # mode, text, expected
    ("ansi", r"\x41\x6c", "Al"),
    ("ansi", r"\101\0", "A\x00"),
    ("ansi", r"\u00e9\U0001F600", "é😀"),
    ("ansi", r"\'\"\?\\", "'\"?\\"),
    ("ansi", r"\cA", "\x01"),
    ("ansi", r"\q", r"\q"),
    ("echo", r"\x6c\0154", "ll"),
    ("echo", r"\154", r"\154"),  # echo -e needs \0nnn for octal
    ("echo%b", r"\154\0154", "ll"),
    ("printf", r"\154\163", "ls"),
    ("printf", r"\0154", "\r4"),  # \015 then a literal 4, as bash prints it
    ("printf", r"a\nb", "a\nb"),
]


@pytest.mark.parametrize(("mode", "text", "expected"), ESCAPES)
def test_unescape(mode: str, text: str, expected: str) -> None:
    assert decode.unescape(text, mode)[0] == expected


def test_escape_stop() -> None:
    assert decode.unescape(r"ab\cde", "echo") == ("ab", True)


def test_raw_bytes_make_utf8() -> None:
    assert decode.unescape(r"\xc3\xa9", "printf")[0] == "é"
    assert decode.is_binary(decode.unescape(r"\xff", "printf")[0])
    assert decode.ansi_c(r"\xff") == "\ufffd"


def test_ansi_c_stops_at_nul() -> None:
    assert decode.ansi_c(r"a\x00b") == "a"


ECHO = [
    (("hi", "there"), "hi there\n"),
    (("-n", "x"), "x"),
    (("-e", r"a\tb"), "a\tb\n"),
    (("-ne", r"\x6c\x73"), "ls"),
    (("-E", r"a\tb"), "a\\tb\n"),
    (("-x", "y"), "-x y\n"),
    ((), "\n"),
]


@pytest.mark.parametrize(("args", "expected"), ECHO)
def test_echo(args: tuple[str, ...], expected: str) -> None:
    assert decode.echo(args) == expected


PRINTF = [
    (("%s",), ""),
    (("%s", "a"), "a"),
    (("%s-%s\\n", "a", "b", "c"), "a-b\nc-\n"),
    (("%s|", "a", "b"), "a|b|"),
    (("%d %5s %-3s|", "42", "x", "y"), "42     x y  |"),
    (("%b", r"\x6c\163"), "ls"),
    (("%c%c", "sx", "l"), "sl"),
    (("%x %o %%", "255", "8"), "ff 10 %"),
    (("--", "%s", "a"), "a"),
    (("plain",), "plain"),
]


@pytest.mark.parametrize(("args", "expected"), PRINTF)
def test_printf(args: tuple[str, ...], expected: str) -> None:
    assert decode.printf(args) == expected


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("-v", "X", "%s", "a"),
        ("%q", "a"),
        ("%*d", "5", "1"),
        ("%d", "abc"),
        ("%999999999d", "1"),
    ],
)
def test_printf_unmodelled(args: tuple[str, ...]) -> None:
    assert decode.printf(args) is None


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


PIPELINES = [
    # stages, stdin of the first stage, text, encoding
    ((("echo", b64("ls -la")), ("base64", "-d")), None, "ls -la", "base64"),
    ((("echo", b64("ls")), ("base64", "--decode")), None, "ls", "base64"),
    ((("echo", b64("ls")), ("base64", "-D")), None, "ls", "base64"),
    ((("echo", b64("ls")[:-1]), ("base64", "-d")), None, "ls", "base64"),  # padding dropped
    ((("base64", "-d"),), b64("id") + "\n", "id", "base64"),
    ((("echo", "bHM=!!"), ("base64", "-d", "-i")), None, "ls", "base64"),
    ((("echo", base64.b32encode(b"ls").decode()), ("base32", "-d")), None, "ls", "base32"),
    ((("echo", "6c 73"), ("xxd", "-r", "-p")), None, "ls", "hex"),
    ((("echo", "6c73"), ("xxd", "-r", "-ps")), None, "ls", "hex"),
    ((("echo", "sl"), ("rev",)), None, "ls\n", "rev"),
    ((("echo", "yf"), ("tr", "a-z", "n-za-m")), None, "ls\n", "tr"),
    ((("echo", "lxs"), ("tr", "-d", "x")), None, "ls\n", "tr"),
    ((("echo", "ls"),), None, "ls\n", "plain"),
    ((("printf", "%s", "ls"),), None, "ls", "plain"),
    ((("printf", r"\x6c\x73"),), None, "ls", "printf-escape"),
    ((("echo", "-e", r"\x6c\x73"),), None, "ls\n", "printf-escape"),
    ((("cat",),), "ls\n", "ls\n", "plain"),
    ((("echo", "ls"), ("cat", "-"), ("tee", "/dev/null")), None, "ls\n", "plain"),
    ((("echo", "ls"), ("base64",), ("base64", "-d")), None, "ls\n", "base64"),
    ((("echo", "bHM="), ("openssl", "base64", "-d")), None, "ls", "base64"),
    ((("echo", b64(b64("id"))), ("base64", "-d"), ("base64", "-d")), None, "id", "base64+base64"),
    ((("echo", "ZGk="), ("base64", "-d"), ("rev",)), None, "id", "base64+rev"),
    ((("/bin/echo", "ls"),), None, "ls\n", "plain"),
]


@pytest.mark.parametrize(("stages", "stdin", "text", "encoding"), PIPELINES)
def test_recovered(
    stages: tuple[tuple[str, ...], ...], stdin: str | None, text: str, encoding: str
) -> None:
    r = run(*stages, stdin=stdin)
    assert (r.text, r.encoding) == (text, encoding)


UNRECOVERED = [
    # stages, encoding, words in the reason
    ((("curl", "-s", "http://x"),), None, ("output of curl", "before it runs")),
    ((("wget", "-qO-", "x"), ("base64", "-d")), None, ("output of wget",)),
    ((("cat", "x.sh"),), None, ("contents of x.sh",)),
    ((("base64", "-d", "p.b64"),), "base64", ("contents of p.b64",)),
    ((("xxd", "-r", "-p", "p.hex"),), "hex", ("contents of p.hex",)),
    ((("echo", "!!!!"), ("base64", "-d")), "base64", ("not valid base64",)),
    ((("echo", "A"), ("base64", "-d")), "base64", ("not valid base64",)),
    ((("echo", "zz"), ("xxd", "-r", "-p")), "hex", ("not valid hex",)),
    ((("echo", "6"), ("xxd", "-r", "-p")), "hex", ("not valid hex",)),
    ((("echo", "//79"), ("base64", "-d")), "base64", ("binary",)),
    ((("printf", r"\xff"),), "printf-escape", ("binary",)),
    ((("echo", "x"), ("xxd",)), None, ("xxd",)),
    ((("openssl", "enc", "-d", "-aes256"),), "openssl", ("openssl",)),
    ((("echo", "x"), ("gunzip",)), "gzip", ("gunzip",)),
    ((("echo", "x"), ("sed", "s/a/b/")), None, ("output of sed",)),
    ((("echo", "x"), ("tr", "[:lower:]", "[:upper:]")), "tr", ("output of tr",)),
    (((),), None, ("compound",)),
]


@pytest.mark.parametrize(("stages", "encoding", "words"), UNRECOVERED)
def test_unrecovered(
    stages: tuple[tuple[str, ...], ...], encoding: str | None, words: tuple[str, ...]
) -> None:
    r = run(*stages)
    assert r.text is None and r.encoding == encoding
    for w in words:
        assert w in f"{r.source} {r.why}"


def test_unknown_arguments() -> None:
    r = decode.evaluate([Step(("echo", "$X"), known=False, unknown=("$X",)), Step(("sh",))])
    assert r.text is None and "$X" in (r.why or "")
    assert r.approx is None  # sh is not a printer


def test_unknown_arguments_of_a_printer_give_an_approximation() -> None:
    r = decode.evaluate([Step(("echo", "rm", "$D"), known=False, unknown=("$D",))])
    assert (r.text, r.approx, r.encoding) == (None, "rm $D\n", None)


def test_unknown_arguments_before_a_decoder_give_nothing() -> None:
    steps = [Step(("echo", "$X"), known=False, unknown=("$X",)), Step(("base64", "-d"))]
    r = decode.evaluate(steps)
    assert (r.text, r.approx, r.encoding) == (None, None, "base64")


def test_heredoc_with_unknown_text() -> None:
    r = decode.evaluate([Step(("cat",), stdin="ls $X\n", stdin_known=False)])
    assert (r.text, r.approx) == (None, "ls $X\n")


def test_stdin_from_a_file() -> None:
    r = decode.evaluate([Step(("base64", "-d"), stdin_file="p.b64")])
    assert (r.text, r.encoding, r.source) == (None, "base64", "contents of p.b64")


def test_size_cap() -> None:
    big = b64("x" * (decode.MAX_DECODED + 10))
    r = run(("echo", big), ("base64", "-d"))
    assert r.text is None and "1 MB" in (r.why or "")


_ARGS = st.lists(
    st.sampled_from(["-d", "-r", "-p", "-e", "-n", "%s", "%b", "a-z", "x"]) | st.text(max_size=12),
    max_size=4,
)
_PROGRAMS = st.sampled_from(["echo", "printf", "base64", "xxd", "rev", "tr", "cat", "openssl"])


@settings(deadline=None, max_examples=300, database=None)
@given(
    st.lists(st.tuples(_PROGRAMS, _ARGS), min_size=1, max_size=4),
    st.none() | st.text(max_size=40),
)
def test_evaluate_never_raises(stages: list[tuple[str, list[str]]], stdin: str | None) -> None:
    steps = [Step((p, *args)) for p, args in stages]
    steps[0] = Step(steps[0].argv, stdin=stdin)
    r = decode.evaluate(steps)
    assert r.text is None or len(r.text) <= decode.MAX_DECODED


@settings(deadline=None, max_examples=300, database=None)
@given(st.text(max_size=60), st.sampled_from(["ansi", "echo", "echo%b", "printf"]))
def test_unescape_never_raises(text: str, mode: str) -> None:
    decode.unescape(text, mode)
