"""Where a command would connect: destinations read from a program's arguments.

Pure functions over argv, no sockets and no DNS. The gate uses them to hold network
tools (curl, nc, ssh, git ...) to the policy's network section before they run; the egress
proxy enforces the same policy on the wire, so a destination missed here is still caught
there.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

_URL = re.compile(
    r"(?i)\b([a-z][a-z0-9+.-]{1,15})://(?:[^@/\s'\"]*@)?(\[[0-9a-f:.]+\]|[^/:\s?#'\"\\)]+)(?::(\d{1,5}))?"
)
_USER_HOST = re.compile(
    r"^[^@\s/:]+@(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(?::(\d{1,5})(?![^\s]*/)|:|$)"
)
_HOST_PORT = re.compile(
    r"^(?:tcp[46]?(?:-connect)?:|udp[46]?(?:-connect)?:|openssl(?:-connect)?:)?([A-Za-z0-9.-]+\.[A-Za-z]{2,}|\d{1,3}(?:\.\d{1,3}){3}|localhost):(\d{1,5})\b",
    re.I,
)
_HOSTISH = re.compile(
    r"^(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\.?$|^\d{1,3}(?:\.\d{1,3}){3}$|^localhost$|^\[?[0-9a-fA-F:]+:[0-9a-fA-F:]*\]?$"
)
_SCHEME_PORTS = {
    "http": 80,
    "https": 443,
    "ftp": 21,
    "ssh": 22,
    "git": 9418,
    "sftp": 22,
    "gopher": 70,
}

# Short options that take a value, per program; the first word that is neither an option
# nor such a value is the host for programs that take one positionally.
_VALUE_OPTS: dict[str, str] = {
    "ssh": "BbcDEeFIiJLlmOoPpQRSWw",
    "nc": "IiMmOPpqsTVWwX",
    "ncat": "cegimopqsw",
    "netcat": "IiMmOPpqsTVWwX",
    "telnet": "bElnSX",
    "ping": "cfIilMmpQsStTWw",
    "ping6": "cfIilMmpQsStTWw",
    "traceroute": "AfgiImNpqstwz",
    "whois": "hpigiTtsv",
    "ftp": "Pos",
    "lftp": "epu",
    "tftp": "mR",
    "rlogin": "el",
    "hping3": "acdEHiIkLMnOpsStTwWxy",
    "finger": "",
    "dig": "bcfkpqtxy",
    "nslookup": "",
    "host": "cmNRtW",
    "mosh": "p",
    # URLs without a scheme (curl example.org) are hosts too.
    "curl": "AbcCdDeEFHKmoPQrTuUwxXYyz",
    "wget": "aABdDeIilOoPQRtTUwX",
}


@dataclass(frozen=True, slots=True)
class Destination:
    host: str
    port: int | None
    via: str  # the argument it was read from


def _port(raw: str | None) -> int | None:
    if not raw:
        return None
    value = int(raw)
    return value if 0 < value < 65536 else None


def from_urls(text: str) -> list[Destination]:
    out = []
    for m in _URL.finditer(text):
        scheme, host = m.group(1).lower(), m.group(2).strip("[]")
        if scheme in ("file", "data", "about", "javascript", "mailto"):
            continue
        port = _port(m.group(3)) or _SCHEME_PORTS.get(scheme)
        out.append(Destination(host.lower().rstrip("."), port, m.group(0)))
    return out


def from_argv(program: str, args: Sequence[str]) -> list[Destination]:
    """Every destination a network tool's arguments name: URLs, ``user@host``,
    ``host:port``, ``@resolver``, ``-h host``, and a positional host."""
    out: list[Destination] = []
    for arg in args:
        out.extend(from_urls(arg))
        if "://" in arg:
            continue
        m = _USER_HOST.match(arg)
        if m:
            out.append(Destination(m.group(1).strip("[]").lower(), _port(m.group(2)), arg))
            continue
        m = _HOST_PORT.match(arg)
        if m:
            out.append(Destination(m.group(1).lower(), _port(m.group(2)), arg))
            continue
        if arg.startswith("@") and _HOSTISH.match(arg[1:]):
            out.append(Destination(arg[1:].lower(), 53, arg))
    for i, arg in enumerate(args[:-1]):
        if arg in ("-h", "--host", "-connect", "--server") and _HOSTISH.match(args[i + 1]):
            out.append(Destination(args[i + 1].lower(), None, args[i + 1]))
    positional = _positional_host(program, args)
    if positional and not any(d.host == positional.host for d in out):
        out.append(positional)
    return out


def _positional_host(program: str, args: Sequence[str]) -> Destination | None:
    value_opts = _VALUE_OPTS.get(program)
    if value_opts is None:
        return None
    skip = False
    words: list[str] = []
    for arg in args:
        if skip:
            skip = False
            continue
        if arg.startswith("-") and len(arg) > 1:
            letters = arg[1:]
            if not arg.startswith("--") and letters[-1] in value_opts and len(letters) == 1:
                skip = True
            continue
        words.append(arg)
    if not words:
        return None
    host = words[0]
    if "@" in host:
        host = host.rsplit("@", 1)[1]
    if not _HOSTISH.match(host):
        return None
    port = None
    if len(words) > 1 and words[1].isdigit():
        port = _port(words[1])
    return Destination(host.strip("[]").lower(), port, words[0])


_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
_CGNAT = ipaddress.ip_network("100.64.0.0/10")


def is_ip(host: str) -> bool:
    """Is ``host`` an IP literal (not a name)?"""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def address_class(host: str) -> str:
    """``loopback``, ``private`` (RFC 1918, CGNAT, ULA), ``link-local``, ``multicast``,
    ``unspecified``, ``public`` (a public IP) or ``name`` (not an IP literal)."""
    if host in _LOOPBACK_NAMES:
        return "loopback"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return "name"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_private or (ip.version == 4 and ip in _CGNAT):
        return "private"
    return "public"
