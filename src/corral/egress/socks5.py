"""SOCKS5 server side (RFC 1928), CONNECT only, no authentication (sans-IO).

The sandbox reaches the proxy over a socket only it can use, so "no authentication" is the
one method offered. BIND and UDP ASSOCIATE are refused: a sandboxed agent gets TCP streams
to vetted destinations, nothing that accepts connections or carries datagrams.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from corral.egress.http1 import normalize_host, valid_host
from corral.errors import CorralError

REPLY_SUCCEEDED = 0x00
REPLY_GENERAL_FAILURE = 0x01
REPLY_NOT_ALLOWED = 0x02
REPLY_NETWORK_UNREACHABLE = 0x03
REPLY_HOST_UNREACHABLE = 0x04
REPLY_REFUSED = 0x05
REPLY_TTL_EXPIRED = 0x06
REPLY_COMMAND_NOT_SUPPORTED = 0x07
REPLY_ADDRESS_NOT_SUPPORTED = 0x08

VERSION = 0x05
METHOD_NO_AUTH = 0x00
METHOD_NONE_ACCEPTABLE = 0xFF
CMD_CONNECT = 0x01
ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04

# SOCKS4 "request rejected or failed": VN 0, CD 91, then DSTPORT and DSTIP ignored.
SOCKS4_REJECTED = b"\x00\x5b" + bytes(6)

_COMMANDS = {0x01: "CONNECT", 0x02: "BIND", 0x03: "UDP ASSOCIATE"}
_ADDRESS_SIZES = {ATYP_IPV4: 4, ATYP_IPV6: 16}


class SocksError(CorralError, ValueError):
    """The client's SOCKS bytes are refused; ``reply`` is what to send it before closing
    (b"" when nothing it would understand can be sent)."""

    def __init__(self, message: str, reply: bytes = b"") -> None:
        self.reply = reply
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class SocksRequest:
    """A CONNECT request. ``host`` is a lower-case name without a trailing dot (``is_name``:
    ATYP 3, the proxy resolves it) or an IP literal's canonical text."""

    host: str
    port: int
    is_name: bool


def reply(code: int, bind_host: str = "0.0.0.0", bind_port: int = 0) -> bytes:
    """The server's reply to a request: VER 5, REP ``code``, RSV 0, then BND.ADDR (an IP
    literal, else a domain name) and BND.PORT."""
    if not 0 <= code <= 0xFF:
        raise ValueError(f"SOCKS reply code must be 0-255, got {code}")
    if not 0 <= bind_port <= 0xFFFF:
        raise ValueError(f"bind port must be 0-65535, got {bind_port}")
    try:
        ip = ipaddress.ip_address(bind_host)
    except ValueError:
        name = bind_host.encode("ascii")
        if not 1 <= len(name) <= 255:
            raise ValueError(f"bind host name must be 1-255 bytes, got {bind_host!r}") from None
        address = bytes([ATYP_DOMAIN, len(name)]) + name
    else:
        address = bytes([ATYP_IPV4 if ip.version == 4 else ATYP_IPV6]) + ip.packed
    return bytes([VERSION, code, 0x00]) + address + bind_port.to_bytes(2, "big")


class Socks5Reader:
    """feed(data) -> (bytes_to_send, request_or_None). First the greeting (VER 5, NMETHODS,
    METHODS): answer 05 00 if 'no authentication' (0x00) is offered, else raise SocksError
    with reply 05 FF. Then the request (VER 5, CMD, RSV 0, ATYP, DST.ADDR, DST.PORT): CMD 1
    (CONNECT) gives the SocksRequest; BIND (2) / UDP ASSOCIATE (3) / others raise SocksError
    whose reply is reply(REPLY_COMMAND_NOT_SUPPORTED); unknown ATYP ->
    REPLY_ADDRESS_NOT_SUPPORTED; a SOCKS4 client (first byte 4) gets a SOCKS4 rejection
    (b"\\x00\\x5b" + 6 zero bytes) in the error. Data may arrive split at any byte; bytes
    after the request are in .rest.

    Clients that send the request without waiting for the method reply are served: the
    bytes to send then hold the method reply, and when the request is refused in the same
    call the error's reply holds both, in order. Once the request is returned, further
    feed() calls add to ``rest`` and return (b"", request); once it has raised, every
    further call raises the same error.
    """

    def __init__(self) -> None:
        self.rest = b""
        self._buf = b""
        self._greeted = False
        self._request: SocksRequest | None = None
        self._error: SocksError | None = None

    def feed(self, data: bytes) -> tuple[bytes, SocksRequest | None]:
        if self._error is not None:
            raise self._error
        if self._request is not None:
            self.rest += data
            return b"", self._request
        self._buf += data
        out = b""
        try:
            if not self._greeted:
                used = self._greeting()
                if used == 0:
                    return b"", None
                self._buf = self._buf[used:]
                self._greeted = True
                out = bytes([VERSION, METHOD_NO_AUTH])
            request, used = self._parse_request()
        except SocksError as exc:
            # The method reply must reach the client before the failure reply, or it reads
            # the failure as a method selection.
            error = SocksError(str(exc), out + exc.reply) if out else exc
            self._error = error
            self._buf = b""
            raise error from None
        if request is None:
            return out, None
        self._request = request
        self.rest = self._buf[used:]
        self._buf = b""
        return out, request

    def _greeting(self) -> int:
        """Bytes used by a complete, accepted greeting; 0 while incomplete."""
        buf = self._buf
        if not buf:
            return 0
        if buf[0] == 0x04:
            raise SocksError(
                "SOCKS4 is not supported; use SOCKS5 (e.g. socks5h://) with this proxy",
                SOCKS4_REJECTED,
            )
        if buf[0] != VERSION:
            hint = ""
            if buf[:1].isalpha():
                hint = "; this looks like HTTP, use the proxy's HTTP port for HTTP clients"
            raise SocksError(f"not a SOCKS5 client (first byte 0x{buf[0]:02x}){hint}")
        if len(buf) < 2:
            return 0
        count = buf[1]
        if len(buf) < 2 + count:
            return 0
        if METHOD_NO_AUTH not in buf[2 : 2 + count]:
            raise SocksError(
                "SOCKS5 client does not offer 'no authentication'; configure it without a "
                "username or password",
                bytes([VERSION, METHOD_NONE_ACCEPTABLE]),
            )
        return 2 + count

    def _parse_request(self) -> tuple[SocksRequest | None, int]:
        """The request and the bytes it used, or (None, 0) while incomplete. Each field is
        checked as soon as it has arrived, so a refusal does not wait for the rest."""
        buf = self._buf
        if len(buf) < 1:
            return None, 0
        if buf[0] != VERSION:
            raise _failure(f"SOCKS request has version {buf[0]}, expected 5")
        if len(buf) < 2:
            return None, 0
        if buf[1] != CMD_CONNECT:
            name = _COMMANDS.get(buf[1], f"command 0x{buf[1]:02x}")
            raise SocksError(
                f"SOCKS {name} is not supported; only CONNECT (TCP streams) is",
                reply(REPLY_COMMAND_NOT_SUPPORTED),
            )
        if len(buf) < 3:
            return None, 0
        if buf[2] != 0x00:
            raise _failure(f"SOCKS request reserved byte is 0x{buf[2]:02x}, must be 0")
        if len(buf) < 4:
            return None, 0
        atyp = buf[3]
        if atyp in _ADDRESS_SIZES:
            start, size = 4, _ADDRESS_SIZES[atyp]
        elif atyp == ATYP_DOMAIN:
            if len(buf) < 5:
                return None, 0
            start, size = 5, buf[4]
            if size == 0:
                raise _failure("SOCKS request has an empty domain name")
        else:
            raise SocksError(
                f"SOCKS address type 0x{atyp:02x} is not supported (IPv4, IPv6 or a name)",
                reply(REPLY_ADDRESS_NOT_SUPPORTED),
            )
        end = start + size + 2
        if len(buf) < end:
            return None, 0
        raw = buf[start : start + size]
        port = int.from_bytes(buf[start + size : end], "big")
        if atyp == ATYP_DOMAIN:
            host = _domain(raw)
        else:
            host = normalize_host(str(ipaddress.ip_address(raw)))
        if port == 0:
            raise _failure(f"SOCKS request for {host} has port 0")
        return SocksRequest(host, port, atyp == ATYP_DOMAIN), end


def _domain(raw: bytes) -> str:
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        raise _failure(
            f"SOCKS domain name {raw!r} is not ASCII; send IDNs in punycode (xn--)"
        ) from None
    if not valid_host(name):
        raise _failure(f"SOCKS domain name {name!r} is not a valid host name")
    return normalize_host(name)


def _failure(message: str) -> SocksError:
    return SocksError(message, reply(REPLY_GENERAL_FAILURE))
