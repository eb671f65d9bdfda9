"""Peek at a TLS ClientHello for the server name (SNI) and ALPN, without terminating TLS.

The proxy checks the name a tunnelled client asks the TLS server for against the name it
CONNECTed to, so that a tunnel opened to an allowed host cannot carry a session with
another one behind the same address (domain fronting). It only reads: the bytes are
forwarded unchanged.

``peek_client_hello`` is stateless: call it again with everything received so far until
``complete`` is True. A ClientHello split over several TLS records (large post-quantum
key shares make it exceed one) is reassembled.
"""

from __future__ import annotations

from dataclasses import dataclass

from corral.egress.http1 import normalize_host, valid_host
from corral.policy import netdest

CONTENT_HANDSHAKE = 0x16
HANDSHAKE_CLIENT_HELLO = 0x01
EXT_SERVER_NAME = 0x0000
EXT_ALPN = 0x0010
NAME_TYPE_HOST_NAME = 0x00
RECORD_HEADER = 5
MAX_RECORD = 2**14  # TLSPlaintext.length limit (RFC 8446 section 5.1)


@dataclass(frozen=True, slots=True)
class Hello:
    """What the bytes so far say. ``complete`` False: need more bytes to decide (``is_tls``
    then says whether they are consistent with TLS so far). ``error`` says why a TLS
    handshake yielded no name: a malformed ClientHello, or one too large to wait for."""

    complete: bool
    is_tls: bool
    sni: str | None
    alpn: tuple[str, ...] = ()
    error: str | None = None


class _Malformed(Exception):
    pass


def peek_client_hello(data: bytes, max_size: int = 64 * 1024) -> Hello:
    """Classify the first bytes a client sent into a tunnel: not TLS, TLS waiting for more,
    or a complete ClientHello with its SNI and ALPN. More than ``max_size`` bytes without a
    complete ClientHello gives up (complete, is_tls, no sni, ``error`` says so)."""
    if (len(data) >= 1 and data[0] != CONTENT_HANDSHAKE) or (len(data) >= 2 and data[1] != 0x03):
        return Hello(complete=True, is_tls=False, sni=None)
    window = data[:max_size]
    handshake = bytearray()
    pos = 0
    try:
        while len(window) - pos >= RECORD_HEADER:
            content_type, major = window[pos], window[pos + 1]
            length = int.from_bytes(window[pos + 3 : pos + 5], "big")
            if content_type != CONTENT_HANDSHAKE:
                raise _Malformed(
                    f"TLS record of content type {content_type} before the ClientHello ended"
                )
            if major != 0x03:
                raise _Malformed(f"TLS record version {major}.{window[pos + 2]} is not 3.x")
            if length == 0 or length > MAX_RECORD:
                raise _Malformed(f"TLS handshake record of length {length} (must be 1-16384)")
            fragment = window[pos + RECORD_HEADER : pos + RECORD_HEADER + length]
            handshake += fragment
            # A partial record still tells the message type and length: refuse early
            # rather than wait for bytes that cannot help.
            size = _message_size(handshake)
            if size is not None and RECORD_HEADER + 4 + size > max_size:
                return _too_large(max_size)
            if len(fragment) < length:
                break
            pos += RECORD_HEADER + length
            if size is not None and len(handshake) >= 4 + size:
                sni, alpn = _parse_client_hello(bytes(handshake[4 : 4 + size]))
                return Hello(complete=True, is_tls=True, sni=sni, alpn=alpn)
    except _Malformed as exc:
        return Hello(complete=True, is_tls=True, sni=None, error=str(exc))
    if len(data) > max_size:
        return _too_large(max_size)
    return Hello(complete=False, is_tls=True, sni=None)


def _message_size(handshake: bytearray) -> int | None:
    """The first handshake message's length once its header is there; _Malformed when it
    is not a ClientHello."""
    if handshake and handshake[0] != HANDSHAKE_CLIENT_HELLO:
        raise _Malformed(f"first TLS handshake message has type {handshake[0]}, not 1")
    if len(handshake) < 4:
        return None
    return int.from_bytes(handshake[1:4], "big")


def _too_large(max_size: int) -> Hello:
    return Hello(
        complete=True,
        is_tls=True,
        sni=None,
        error=f"no complete ClientHello within the first {max_size} bytes",
    )


class _Cursor:
    """Reads the length-prefixed fields of a TLS structure; _Malformed on overrun."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def take(self, size: int, field: str) -> bytes:
        if self.pos + size > len(self.data):
            raise _Malformed(f"{self.what}: {field} runs past the end")
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def number(self, size: int, field: str) -> int:
        return int.from_bytes(self.take(size, field), "big")

    def vector(self, length_size: int, field: str, minimum: int = 0) -> bytes:
        size = self.number(length_size, f"length of {field}")
        if size < minimum:
            raise _Malformed(f"{self.what}: {field} is shorter than {minimum} bytes")
        return self.take(size, field)

    @property
    def done(self) -> bool:
        return self.pos == len(self.data)

    def finish(self) -> None:
        if not self.done:
            left = len(self.data) - self.pos
            raise _Malformed(f"{self.what}: {left} byte{'' if left == 1 else 's'} left over")


def _parse_client_hello(body: bytes) -> tuple[str | None, tuple[str, ...]]:
    hello = _Cursor(body, "ClientHello")
    hello.take(2, "legacy_version")
    hello.take(32, "random")
    if len(hello.vector(1, "legacy_session_id")) > 32:
        raise _Malformed("ClientHello: legacy_session_id is longer than 32 bytes")
    if len(hello.vector(2, "cipher_suites", minimum=2)) % 2:
        raise _Malformed("ClientHello: cipher_suites has an odd length")
    hello.vector(1, "legacy_compression_methods", minimum=1)
    if hello.done:
        return None, ()  # before TLS 1.2 clients could send no extensions at all
    extensions = _Cursor(hello.vector(2, "extensions"), "ClientHello extensions")
    hello.finish()
    seen: set[int] = set()
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    while not extensions.done:
        kind = extensions.number(2, "extension type")
        data = extensions.vector(2, f"extension {kind}")
        if kind in seen:
            raise _Malformed(f"ClientHello has extension {kind} twice")
        seen.add(kind)
        if kind == EXT_SERVER_NAME:
            sni = _server_name(data)
        elif kind == EXT_ALPN:
            alpn = _alpn(data)
    return sni, alpn


def _server_name(data: bytes) -> str | None:
    outer = _Cursor(data, "server_name extension")
    names = _Cursor(outer.vector(2, "server_name_list", minimum=1), "server_name_list")
    outer.finish()
    host: str | None = None
    while not names.done:
        name_type = names.number(1, "name_type")
        raw = names.vector(2, "name", minimum=1)
        if name_type != NAME_TYPE_HOST_NAME:
            continue
        if host is not None:
            raise _Malformed("server_name extension has more than one host_name")
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise _Malformed(f"server_name {raw[:64]!r} is not ASCII") from None
        if not valid_host(text):
            raise _Malformed(f"server_name {text[:100]!r} is not a valid host name")
        if netdest.is_ip(text):
            raise _Malformed(f"server_name {text!r} is an IP address (RFC 6066 forbids that)")
        host = normalize_host(text)
    return host


def _alpn(data: bytes) -> tuple[str, ...]:
    outer = _Cursor(data, "ALPN extension")
    names = _Cursor(outer.vector(2, "protocol_name_list", minimum=2), "protocol_name_list")
    outer.finish()
    protocols: list[str] = []
    while not names.done:
        # Protocol ids are opaque bytes; GREASE values are not printable.
        raw = names.vector(1, "protocol name", minimum=1)
        protocols.append(raw.decode("ascii", "backslashreplace"))
    return tuple(protocols)
