"""HTTP/1.x request heads for the forward proxy (sans-IO: bytes in, objects and bytes out).

``HeadReader`` collects one request head, however the bytes are split, and checks it
strictly: a proxy that reads a request differently from the server behind it can be
walked past (request smuggling, domain fronting), so anything ambiguous is refused with
the status code a client can act on (``HttpError.status``).

``valid_host`` and ``split_authority`` are shared with ``socks5`` and ``tls`` so that every
way into the proxy agrees on what a host name is.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from corral.errors import CorralError

DEFAULT_PORT = 80

_TCHARS = frozenset(
    b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)
_LABEL_RE = re.compile(r"[A-Za-z0-9_-]{1,63}")
# What inet_aton() would read as a number: a name whose last label looks like this is
# turned into an address by the resolver ("127.1", "0x7f000001"), so it would slip past
# policy written for the address. No real top-level domain is numeric.
_NUMERIC_LABEL_RE = re.compile(r"[0-9]+|0[xX][0-9a-fA-F]*")
_VERSION_RE = re.compile(rb"HTTP/[0-9]\.[0-9]")
# Field values: visible ASCII, obs-text, SP and HTAB. Other control bytes (NUL above all)
# are read differently by different servers.
_BAD_VALUE_BYTES = frozenset(range(0x00, 0x20)) - {0x09}
# Hop-by-hop headers (RFC 9110 section 7.6.1) and the proxy's own credentials.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
    }
)
# Never dropped even when Connection names them: they frame the body we forward byte for
# byte, or name the destination we checked ("Connection: Content-Length" is a known trick
# to make a proxy and a server disagree on where a request ends).
_KEEP_ALWAYS = frozenset({"host", "content-length", "transfer-encoding"})


class HttpError(CorralError, ValueError):
    """A request the proxy refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


def valid_host(name: str) -> bool:
    """Is ``name`` an IP literal (IPv6 without brackets) or a DNS host name: labels of
    1-63 letters, digits, hyphens or underscores, at most 253 characters, an optional
    trailing dot, and a last label that is not a number?"""
    if _ip_literal(name) is not None:
        return True
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    if not all(_LABEL_RE.fullmatch(label) for label in labels):
        return False
    return not _NUMERIC_LABEL_RE.fullmatch(labels[-1])


def normalize_host(name: str) -> str:
    """The form hosts are compared and reported in: an IP literal in its canonical text
    (an IPv4-mapped IPv6 address as IPv4), else the name lower-cased without a trailing
    dot. ``name`` must be ``valid_host``."""
    ip = _ip_literal(name)
    if ip is not None:
        return ip
    return name.lower().removesuffix(".")


def _ip_literal(text: str) -> str | None:
    # Zone ids ("fe80::1%eth0") name an interface of the proxy's host: never a destination.
    if "%" in text:
        return None
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    # ::ffff:127.0.0.1 reaches 127.0.0.1 through a dual-stack socket; report the address
    # actually reached so that policy written for IPv4 applies to it.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def split_authority(text: str, *, what: str) -> tuple[str, int | None]:
    """Split ``host[:port]`` or ``[v6]:port`` into a normalized host and the port (None if
    absent). ``what`` names the text in error messages. Raises HttpError(400)."""
    if "@" in text:
        raise HttpError(400, f"{what} {text!r} contains user information ('user@'); not allowed")
    port_text: str | None = None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise HttpError(400, f"{what} {text!r} has an unclosed '[' around an IPv6 address")
        host, after = text[1:end], text[end + 1 :]
        if after:
            if not after.startswith(":"):
                raise HttpError(400, f"{what} {text!r} has text after the IPv6 address")
            port_text = after[1:]
        ip = _ip_literal(host)
        if ip is None or ":" not in host:
            raise HttpError(400, f"{what} {text!r}: {host!r} in brackets is not an IPv6 address")
        return ip, _port(port_text, text, what)
    host, sep, port_part = text.rpartition(":")
    if not sep:
        host = text
    elif ":" in host:
        raise HttpError(400, f"{what} {text!r}: put an IPv6 address in brackets, e.g. [::1]:443")
    else:
        port_text = port_part
    if not valid_host(host):
        raise HttpError(400, f"{what} {text!r}: {host!r} is not a valid host name or IP address")
    return normalize_host(host), _port(port_text, text, what)


def _port(port_text: str | None, text: str, what: str) -> int | None:
    if port_text is None:
        return None
    # Length first: int() on a huge digit string is slow, and past 4300 digits it raises.
    if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5):
        raise HttpError(400, f"{what} {text!r}: port {port_text!r} is not a number 1-65535")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise HttpError(400, f"{what} {text!r}: port {port} is out of range 1-65535")
    return port


def _hostport(host: str, port: int, default: int | None = None) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if port == default else f"{shown}:{port}"


@dataclass(frozen=True, slots=True)
class RequestHead:
    """One parsed request head. ``host``/``port`` are the destination (from the target, or
    from the Host header for origin-form); ``path`` is the origin-form target to send
    upstream ("" for CONNECT). ``headers`` keep the names as sent and values decoded as
    Latin-1, so ``forward_head`` re-encodes them byte for byte."""

    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]
    host: str
    port: int
    path: str

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        wanted = name.lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return None

    def header_values(self, name: str) -> tuple[str, ...]:
        """Every value of header ``name`` (case-insensitive), in order."""
        wanted = name.lower()
        return tuple(value for key, value in self.headers if key.lower() == wanted)

    @property
    def is_connect(self) -> bool:
        return self.method == "CONNECT"

    @property
    def content_length(self) -> int | None:
        """The body length from Content-Length (already checked to be one plain decimal
        value), or None when there is none (no body, or a chunked one)."""
        values = self.header_values("content-length")
        if not values:
            return None
        return int(values[0].split(",")[0].strip())

    @property
    def is_chunked(self) -> bool:
        """Is the body chunked (Transfer-Encoding ending in chunked)?"""
        return bool(self.header_values("transfer-encoding"))


class HeadReader:
    """Incremental reader of one request head. feed() returns None until the blank line
    ending the head has arrived, then the RequestHead; bytes after the head are in .rest.

    Lines end in CRLF or a bare LF; a CR anywhere else is refused. Empty lines before the
    request line are skipped (RFC 9112 section 2.2). Once the head is complete, further
    feed() calls append to ``rest`` and return the head again; once it has raised, every
    further call raises the same error.
    """

    def __init__(self, max_size: int = 64 * 1024) -> None:
        if max_size < 16:
            raise ValueError(f"max_size must be at least 16 bytes, got {max_size}")
        self.max_size = max_size
        self.rest = b""
        self._buf = bytearray()
        self._scan = 0  # where the next line starts in _buf
        # Where the search for the next LF resumes: fed a byte at a time, a long line would
        # otherwise be searched again from its start on every call.
        self._searched = 0
        self._request_line: tuple[str, str, str] | None = None
        self._headers: list[tuple[str, str]] = []
        self._head: RequestHead | None = None
        self._error: HttpError | None = None

    def feed(self, data: bytes) -> RequestHead | None:
        """Add bytes; the RequestHead once complete, else None. Raises HttpError."""
        if self._error is not None:
            raise self._error
        if self._head is not None:
            self.rest += data
            return self._head
        self._buf += data
        try:
            return self._advance()
        except HttpError as exc:
            self._error = exc
            self._buf.clear()
            raise

    def _advance(self) -> RequestHead | None:
        buf = self._buf
        while True:
            end = buf.find(b"\n", max(self._scan, self._searched))
            if end < 0:
                self._searched = len(buf)
                # Judge the size only on what could still be head: an unfinished line
                # already past max_size can never end inside it.
                if len(buf) > self.max_size:
                    raise self._too_large()
                return None
            if end + 1 > self.max_size:
                raise self._too_large()
            line = bytes(buf[self._scan : end])
            self._scan = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if b"\r" in line:
                raise HttpError(
                    400, "a bare CR inside a line of the request head; end lines with CRLF"
                )
            if not line:
                if self._request_line is None:
                    continue
                self.rest = bytes(buf[self._scan :])
                buf.clear()
                self._head = _build_head(self._request_line, self._headers)
                return self._head
            if self._request_line is None:
                self._request_line = _parse_request_line(line)
            else:
                self._headers.append(_parse_header_line(line))

    def _too_large(self) -> HttpError:
        if self._request_line is None:
            return HttpError(414, f"request line longer than {self.max_size} bytes")
        return HttpError(431, f"request head longer than {self.max_size} bytes")


def _parse_request_line(line: bytes) -> tuple[str, str, str]:
    parts = line.split(b" ")
    if len(parts) != 3 or not all(parts):
        raise HttpError(
            400,
            f"malformed request line {_show(line)}: expected 'METHOD target HTTP/1.1' "
            "separated by single spaces",
        )
    method, target, version = parts
    if not _is_token(method):
        raise HttpError(400, f"method {_show(method)} is not a valid HTTP token")
    if not _VERSION_RE.fullmatch(version):
        raise HttpError(400, f"malformed HTTP version {_show(version)}; expected HTTP/1.1")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise HttpError(505, f"{version.decode()} is not supported; use HTTP/1.1 or HTTP/1.0")
    if not all(0x21 <= b <= 0x7E for b in target) or b"#" in target:
        raise HttpError(
            400, f"request target {_show(target)} contains characters that must be %-encoded"
        )
    return method.decode("ascii"), target.decode("ascii"), version.decode("ascii")


def _parse_header_line(line: bytes) -> tuple[str, str]:
    if line[:1] in (b" ", b"\t"):
        raise HttpError(
            400, "header line starts with whitespace (obsolete line folding); send one line"
        )
    name, sep, value = line.partition(b":")
    if not sep:
        raise HttpError(400, f"header line {_show(line)} has no ':'")
    if not _is_token(name):
        raise HttpError(400, f"header name {_show(name)} is not a valid HTTP token")
    value = value.strip(b" \t")
    if any(b in _BAD_VALUE_BYTES for b in value):
        raise HttpError(400, f"header {name.decode()} contains control characters (NUL, CR, ...)")
    return name.decode("ascii"), value.decode("latin-1")


def _build_head(request_line: tuple[str, str, str], fields: list[tuple[str, str]]) -> RequestHead:
    method, target, version = request_line
    headers = tuple(fields)
    by_name: dict[str, list[str]] = {}
    for key, value in headers:
        by_name.setdefault(key.lower(), []).append(value)
    _check_framing(version, by_name)

    host_values = by_name.get("host", [])
    if len(host_values) > 1:
        raise HttpError(400, "more than one Host header; send exactly one")
    host_header: tuple[str, int | None] | None = None
    if host_values:
        if not host_values[0]:
            raise HttpError(400, "the Host header is empty")
        host_header = split_authority(host_values[0], what="Host header")

    is_connect = method == "CONNECT"
    if target == "*":
        raise HttpError(400, "asterisk-form requests (OPTIONS *) cannot be proxied")
    if is_connect:
        if target.startswith("/") or "://" in target:
            raise HttpError(
                400, f"CONNECT needs a host:port target (e.g. example.org:443), got {target!r}"
            )
        host, port = split_authority(target, what="CONNECT target")
        if port is None:
            raise HttpError(400, f"CONNECT target {target!r} needs a port, e.g. {target}:443")
        path = ""
        default_port = port
    elif target.startswith("/"):
        if host_header is None:
            raise HttpError(
                400,
                f"request for {target!r} has no Host header; send an absolute URL "
                "(http://host/path) or a Host header",
            )
        host, header_port = host_header
        port = DEFAULT_PORT if header_port is None else header_port
        return RequestHead(method, target, version, headers, host, port, target)
    else:
        host, port, path = _absolute_form(target)
        default_port = DEFAULT_PORT

    if host_header is not None:
        header_host, header_port = host_header
        if header_port is None:
            header_port = default_port
        if (header_host, header_port) != (host, port):
            # Ports are always shown for CONNECT: there is no default to leave out.
            omit = None if is_connect else DEFAULT_PORT
            raise HttpError(
                400,
                f"Host header names {_hostport(header_host, header_port, omit)} "
                f"but the request is for {_hostport(host, port, omit)}",
            )
    return RequestHead(method, target, version, headers, host, port, path)


def _absolute_form(target: str) -> tuple[str, int, str]:
    scheme, sep, rest = target.partition("://")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        raise HttpError(
            400, f"request target {target!r} is not a URL (http://host/path) or a path (/path)"
        )
    scheme = scheme.lower()
    if scheme == "https":
        raise HttpError(
            400,
            f"{target!r}: an https:// URL must go through a CONNECT tunnel; configure the "
            "client to use this proxy for HTTPS (CONNECT), not to send the URL in the clear",
        )
    if scheme != "http":
        raise HttpError(400, f"{target!r}: scheme {scheme}:// is not supported; only http://")
    cut = len(rest)
    for stop in "/?":
        at = rest.find(stop)
        if 0 <= at < cut:
            cut = at
    authority, path = rest[:cut], rest[cut:]
    if not authority:
        raise HttpError(400, f"{target!r} has no host")
    host, port = split_authority(authority, what="URL")
    if not path.startswith("/"):
        path = "/" + path
    return host, DEFAULT_PORT if port is None else port, path


def _check_framing(version: str, by_name: dict[str, list[str]]) -> None:
    lengths = by_name.get("content-length")
    codings = by_name.get("transfer-encoding")
    if lengths is not None and codings is not None:
        raise HttpError(400, "request has both Content-Length and Transfer-Encoding; send one")
    if lengths is not None:
        items = [item.strip(" \t") for value in lengths for item in value.split(",")]
        for item in items:
            if not (item.isascii() and item.isdigit()):
                raise HttpError(400, f"Content-Length {item!r} is not a decimal number")
            if len(item.lstrip("0")) > 18:
                raise HttpError(400, f"Content-Length {item} is too large")
        if len({int(item) for item in items}) > 1:
            raise HttpError(400, f"conflicting Content-Length values {', '.join(items)}")
    if codings is not None:
        if version == "HTTP/1.0":
            # RFC 9112 section 6.1: HTTP/1.0 has no transfer codings, so the framing of
            # such a message is unreliable.
            raise HttpError(400, "Transfer-Encoding is not allowed in an HTTP/1.0 request")
        names = [item.strip(" \t").lower() for value in codings for item in value.split(",")]
        names = [name for name in names if name]
        if not names:
            raise HttpError(400, "Transfer-Encoding is empty")
        if names[-1] != "chunked":
            raise HttpError(
                501,
                f"Transfer-Encoding {', '.join(names)} is not supported; it must end in chunked",
            )
        if names.count("chunked") > 1:
            raise HttpError(400, "Transfer-Encoding applies chunked more than once")


def _is_token(data: bytes) -> bool:
    return bool(data) and all(b in _TCHARS for b in data)


def _show(data: bytes, limit: int = 60) -> str:
    text = repr(data[:limit])[1:]
    return text + ("..." if len(data) > limit else "")


def forward_head(head: RequestHead) -> bytes:
    """The request head as sent upstream: origin-form request line with the same method and
    version, the client's headers minus hop-by-hop ones (Connection and every header it
    names, Proxy-Connection, Proxy-Authorization, Proxy-Authenticate, Keep-Alive, TE,
    Trailer, Upgrade), a Host header (the client's, or built from host:port when absent;
    omit :80), and ``Connection: close`` (the proxy handles one request per client
    connection)."""
    if head.is_connect:
        raise ValueError("a CONNECT request is not forwarded; open a tunnel instead")
    named = {
        token.strip(" \t").lower()
        for value in head.header_values("connection")
        for token in value.split(",")
    }
    drop = (_HOP_BY_HOP | named) - _KEEP_ALWAYS
    host = head.header("host") or _hostport(head.host, head.port, DEFAULT_PORT)
    lines = [f"{head.method} {head.path or '/'} {head.version}", f"Host: {host}"]
    for name, value in head.headers:
        lowered = name.lower()
        if lowered != "host" and lowered not in drop:
            lines.append(f"{name}: {value}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def response(
    status: int, reason: str, body: str = "", headers: Sequence[tuple[str, str]] = ()
) -> bytes:
    """A complete HTTP/1.1 response with Content-Type text/plain; charset=utf-8,
    Content-Length and Connection: close."""
    if not 100 <= status <= 599:
        raise ValueError(f"HTTP status must be 100-599, got {status}")
    payload = body.encode("utf-8")
    fields = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(payload))),
        ("Connection", "close"),
        *headers,
    ]
    lines = [f"HTTP/1.1 {status} {reason}"]
    for name, value in fields:
        if not _is_token(name.encode("latin-1", "replace")):
            raise ValueError(f"header name {name!r} is not a valid HTTP token")
        lines.append(f"{name}: {value}")
    # A CR or LF here would let text that reached the reason or a header (a host name, a
    # policy message) inject headers or a second response.
    for line in lines:
        if "\r" in line or "\n" in line:
            raise ValueError(f"response line {line!r} contains CR or LF")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + payload


class ChunkedBody:
    """Finds where a chunked request body ends, so that nothing after it (a second,
    pipelined request no policy has seen) reaches the server. ``feed`` returns how many
    of the bytes given belong to the body once its end is among them, else None."""

    def __init__(self, max_line: int = 4096) -> None:
        self._state = "size"  # size | data | data-crlf | trailer
        self._line = b""
        self._left = 0
        self._max_line = max_line
        self.done = False

    def feed(self, data: bytes) -> int | None:
        if self.done:
            return 0
        i = 0
        while i < len(data):
            if self._state == "data":
                take = min(self._left, len(data) - i)
                i += take
                self._left -= take
                if self._left == 0:
                    self._state = "data-crlf"
                continue
            nl = data.find(b"\n", i)
            if nl < 0:
                self._line += data[i:]
                if len(self._line) > self._max_line:
                    raise HttpError(400, "chunked body: line too long")
                return None
            line = (self._line + data[i:nl]).rstrip(b"\r")
            self._line = b""
            i = nl + 1
            if self._state == "size":
                size_text = line.split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise HttpError(400, f"chunked body: bad chunk size {_show(line)}") from None
                if size_text.startswith((b"-", b"+")) or size < 0:
                    raise HttpError(400, f"chunked body: bad chunk size {_show(line)}")
                if size == 0:
                    self._state = "trailer"
                else:
                    self._left, self._state = size, "data"
            elif self._state == "data-crlf":
                if line:
                    raise HttpError(400, "chunked body: chunk data longer than its size")
                self._state = "size"
            elif not line:  # trailer section ends with an empty line
                self.done = True
                return i
        return None
