"""HTTP/1.x request heads: parsing, refusals, forwarding, and fuzzing of the reader."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.egress.http1 import (
    HeadReader,
    HttpError,
    RequestHead,
    forward_head,
    response,
    valid_host,
)

Outcome = tuple[str, object, object]


def parse(raw: bytes, max_size: int = 64 * 1024) -> RequestHead:
    reader = HeadReader(max_size)
    head = reader.feed(raw)
    assert head is not None, f"head incomplete: {raw!r}"
    return head


def run(chunks: list[bytes], max_size: int = 64 * 1024) -> Outcome:
    """Feed ``chunks`` one by one: ("head", head, rest), ("error", status, message) or
    ("incomplete", None, None)."""
    reader = HeadReader(max_size)
    head = None
    try:
        for chunk in chunks:
            head = reader.feed(chunk)
    except HttpError as exc:
        return ("error", exc.status, str(exc))
    if head is None:
        return ("incomplete", None, None)
    return ("head", head, reader.rest)


# -- accepted requests --------------------------------------------------------------------

ACCEPTED: list[tuple[bytes, str, int, str]] = [
    (b"GET http://example.org/ HTTP/1.1\r\n\r\n", "example.org", 80, "/"),
    (b"GET http://example.org HTTP/1.1\r\n\r\n", "example.org", 80, "/"),
    (b"GET http://example.org?q=1 HTTP/1.1\r\n\r\n", "example.org", 80, "/?q=1"),
    (b"GET HTTP://Example.ORG./a/b?c=d HTTP/1.0\r\n\r\n", "example.org", 80, "/a/b?c=d"),
    (b"POST http://example.org:8080/x HTTP/1.1\r\n\r\n", "example.org", 8080, "/x"),
    (b"GET http://10.0.0.1:81/ HTTP/1.1\r\n\r\n", "10.0.0.1", 81, "/"),
    (b"GET http://[::1]:8080/p HTTP/1.1\r\n\r\n", "::1", 8080, "/p"),
    (b"GET http://[2001:DB8:0:0::1]/ HTTP/1.1\r\n\r\n", "2001:db8::1", 80, "/"),
    (b"GET http://[::ffff:127.0.0.1]/ HTTP/1.1\r\n\r\n", "127.0.0.1", 80, "/"),
    (b"GET http://my_host.internal/ HTTP/1.1\r\n\r\n", "my_host.internal", 80, "/"),
    (b"CONNECT example.org:443 HTTP/1.1\r\n\r\n", "example.org", 443, ""),
    (b"CONNECT [::1]:443 HTTP/1.1\r\n\r\n", "::1", 443, ""),
    (b"CONNECT 93.184.215.14:443 HTTP/1.1\r\n\r\n", "93.184.215.14", 443, ""),
    (b"GET /x?y HTTP/1.1\r\nHost: example.org\r\n\r\n", "example.org", 80, "/x?y"),
    (b"GET / HTTP/1.1\r\nHost: example.org:8000\r\n\r\n", "example.org", 8000, "/"),
    (b"GET / HTTP/1.1\r\nhost: [::1]:81\r\n\r\n", "::1", 81, "/"),
    (b"GET / HTTP/1.1\nHost: example.org\n\n", "example.org", 80, "/"),  # bare LF
    (b"\r\n\r\nGET / HTTP/1.1\r\nHost: a.b\r\n\r\n", "a.b", 80, "/"),  # leading blank lines
    (b"PURGE http://example.org/ HTTP/1.1\r\n\r\n", "example.org", 80, "/"),  # unknown method
]


@pytest.mark.parametrize(("raw", "host", "port", "path"), ACCEPTED)
def test_accepted(raw: bytes, host: str, port: int, path: str) -> None:
    head = parse(raw)
    assert (head.host, head.port, head.path) == (host, port, path)
    assert head.version in ("HTTP/1.1", "HTTP/1.0")
    assert head.is_connect == (head.method == "CONNECT")


def test_fields_kept_as_sent() -> None:
    raw = (
        b"POST http://example.org/up HTTP/1.1\r\n"
        b"Host: Example.org\r\n"
        b"X-Thing:   spaced value \t\r\n"
        b"x-thing: second\r\n"
        b"Empty:\r\n"
        b"Latin: caf\xe9\r\n"
        b"Content-Length: 5\r\n"
        b"\r\nhello"
    )
    reader = HeadReader()
    head = reader.feed(raw)
    assert head is not None
    assert head.method == "POST"
    assert head.target == "http://example.org/up"
    assert head.headers == (
        ("Host", "Example.org"),
        ("X-Thing", "spaced value"),
        ("x-thing", "second"),
        ("Empty", ""),
        ("Latin", "café"),
        ("Content-Length", "5"),
    )
    assert head.header("X-THING") == "spaced value"
    assert head.header_values("x-thing") == ("spaced value", "second")
    assert head.header("missing") is None
    assert head.content_length == 5
    assert not head.is_chunked
    assert reader.rest == b"hello"


def test_chunked_and_repeated_equal_lengths() -> None:
    head = parse(b"POST http://a.example/ HTTP/1.1\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n")
    assert head.is_chunked
    assert head.content_length is None
    head = parse(
        b"POST http://a.example/ HTTP/1.1\r\nContent-Length: 7, 7\r\nContent-Length: 7\r\n\r\n"
    )
    assert head.content_length == 7


def test_host_header_matching_target_is_fine() -> None:
    for host in (b"example.org", b"EXAMPLE.org.", b"example.org:80"):
        parse(b"GET http://example.org/ HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    for host in (b"example.org", b"example.org:443", b"Example.Org.:443"):
        parse(b"CONNECT example.org:443 HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")


def test_rest_and_later_feeds() -> None:
    reader = HeadReader()
    assert reader.feed(b"CONNECT a.example:443 HTTP/1.1\r\n\r\n\x16\x03") is not None
    assert reader.rest == b"\x16\x03"
    assert reader.feed(b"\x01") is not None
    assert reader.rest == b"\x16\x03\x01"


# -- refused requests ---------------------------------------------------------------------

REFUSED: list[tuple[bytes, int, str]] = [
    (b"GET https://example.org/ HTTP/1.1\r\n\r\n", 400, "CONNECT"),
    (b"GET HTTPS://example.org/ HTTP/1.1\r\n\r\n", 400, "CONNECT"),
    (b"GET ftp://example.org/ HTTP/1.1\r\n\r\n", 400, "ftp:// is not supported"),
    (b"GET http://user@example.org/ HTTP/1.1\r\n\r\n", 400, "user information"),
    (b"GET http://user:pw@example.org/ HTTP/1.1\r\n\r\n", 400, "user information"),
    (b"GET http:///x HTTP/1.1\r\n\r\n", 400, "no host"),
    (b"GET http://example.org:0/ HTTP/1.1\r\n\r\n", 400, "out of range"),
    (b"GET http://example.org:65536/ HTTP/1.1\r\n\r\n", 400, "out of range"),
    (b"GET http://example.org:/ HTTP/1.1\r\n\r\n", 400, "is not a number"),
    (b"GET http://example.org:8o/ HTTP/1.1\r\n\r\n", 400, "is not a number"),
    (b"GET http://example.org:0000080/ HTTP/1.1\r\n\r\n", 400, "is not a number"),
    (b"GET http://exa mple.org/ HTTP/1.1\r\n\r\n", 400, "malformed request line"),
    (b"GET http://ex!ample.org/ HTTP/1.1\r\n\r\n", 400, "not a valid host name"),
    (b"GET http://127.1/ HTTP/1.1\r\n\r\n", 400, "not a valid host name"),
    (b"GET http://0x7f000001/ HTTP/1.1\r\n\r\n", 400, "not a valid host name"),
    (b"GET http://010.0.0.1/ HTTP/1.1\r\n\r\n", 400, "not a valid host name"),
    (b"GET http://a..b/ HTTP/1.1\r\n\r\n", 400, "not a valid host name"),
    (b"GET http://" + b"a" * 64 + b".org/ HTTP/1.1\r\n\r\n", 400, "not a valid host name"),
    (b"GET http://" + b"abcdefgh." * 32 + b"org/ HTTP/1.1\r\n\r\n", 400, "not a valid host"),
    (b"GET http://::1/ HTTP/1.1\r\n\r\n", 400, "brackets"),
    (b"GET http://[::1/ HTTP/1.1\r\n\r\n", 400, "unclosed"),
    (b"GET http://[1.2.3.4]/ HTTP/1.1\r\n\r\n", 400, "not an IPv6 address"),
    (b"GET http://[fe80::1%25eth0]/ HTTP/1.1\r\n\r\n", 400, "not an IPv6 address"),
    (b"GET http://[::1]x/ HTTP/1.1\r\n\r\n", 400, "after the IPv6"),
    (b"GET http://example.org/#frag HTTP/1.1\r\n\r\n", 400, "%-encoded"),
    (b"GET http://example.org/\xff HTTP/1.1\r\n\r\n", 400, "%-encoded"),
    (b"GET example.org:80 HTTP/1.1\r\n\r\n", 400, "not a URL"),
    (b"OPTIONS * HTTP/1.1\r\nHost: a.example\r\n\r\n", 400, "asterisk"),
    (b"GET / HTTP/1.1\r\n\r\n", 400, "no Host header"),
    (b"CONNECT example.org HTTP/1.1\r\n\r\n", 400, "needs a port"),
    (b"CONNECT /x HTTP/1.1\r\nHost: a.example\r\n\r\n", 400, "host:port target"),
    (b"CONNECT http://example.org:443/ HTTP/1.1\r\n\r\n", 400, "host:port target"),
    (b"CONNECT user@example.org:443 HTTP/1.1\r\n\r\n", 400, "user information"),
    (b"GET / HTTP/2.0\r\nHost: a.example\r\n\r\n", 505, "HTTP/2.0 is not supported"),
    (b"GET / HTTP/0.9\r\nHost: a.example\r\n\r\n", 505, "not supported"),
    (b"GET / http/1.1\r\nHost: a.example\r\n\r\n", 400, "malformed HTTP version"),
    (b"GET / HTTP/1.1x\r\nHost: a.example\r\n\r\n", 400, "malformed HTTP version"),
    (b"GET /\r\n\r\n", 400, "malformed request line"),
    (b"GET  / HTTP/1.1\r\n\r\n", 400, "single spaces"),
    (b"G(T / HTTP/1.1\r\n\r\n", 400, "method"),
    (b"GET / HTTP/1.1\r\nHost: a.example\r\n folded\r\n\r\n", 400, "folding"),
    (b"GET / HTTP/1.1\r\n\tHost: a.example\r\n\r\n", 400, "folding"),
    (b"GET / HTTP/1.1\r\nHost : a.example\r\n\r\n", 400, "header name"),
    (b"GET / HTTP/1.1\r\nHo(st: a.example\r\n\r\n", 400, "header name"),
    (b"GET / HTTP/1.1\r\n: x\r\n\r\n", 400, "header name"),
    (b"GET / HTTP/1.1\r\nNoColon\r\n\r\n", 400, "no ':'"),
    (b"GET / HTTP/1.1\r\nHost: a.example\r\nX: a\x00b\r\n\r\n", 400, "control"),
    (b"GET / HTTP/1.1\r\nHost: a.example\r\nX: a\rb\r\n\r\n", 400, "bare CR"),
    (b"GET / HTTP/1.1\rHost: a.example\r\n\r\n", 400, "bare CR"),
    (b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\r\n", 400, "bare CR"),
    (b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: a.example\r\n\r\n", 400, "more than one Host"),
    (b"GET / HTTP/1.1\r\nHost:\r\n\r\n", 400, "Host header is empty"),
    (b"GET / HTTP/1.1\r\nHost: a.example:99999\r\n\r\n", 400, "out of range"),
    (b"GET / HTTP/1.1\r\nHost: u@a.example\r\n\r\n", 400, "user information"),
    (
        b"GET http://allowed.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n",
        400,
        "Host header names evil.example but the request is for allowed.example",
    ),
    (
        b"GET http://allowed.example/ HTTP/1.1\r\nHost: allowed.example:8080\r\n\r\n",
        400,
        "Host header names allowed.example:8080 but the request is for allowed.example",
    ),
    (
        b"GET http://allowed.example:8080/ HTTP/1.1\r\nHost: allowed.example\r\n\r\n",
        400,
        "Host header names allowed.example but the request is for allowed.example:8080",
    ),
    (
        b"CONNECT allowed.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
        400,
        "Host header names evil.example:443 but the request is for allowed.example:443",
    ),
    (
        b"CONNECT allowed.example:443 HTTP/1.1\r\nHost: allowed.example:80\r\n\r\n",
        400,
        "Host header names allowed.example:80 but the request is for allowed.example:443",
    ),
    (
        b"POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        400,
        "both Content-Length and Transfer-Encoding",
    ),
    (b"POST / HTTP/1.1\r\nHost: a.b\r\nContent-Length: +5\r\n\r\n", 400, "not a decimal"),
    (b"POST / HTTP/1.1\r\nHost: a.b\r\nContent-Length: 0x5\r\n\r\n", 400, "not a decimal"),
    (b"POST / HTTP/1.1\r\nHost: a.b\r\nContent-Length:\r\n\r\n", 400, "not a decimal"),
    (b"POST / HTTP/1.1\r\nHost: a.b\r\nContent-Length: 5 5\r\n\r\n", 400, "not a decimal"),
    (b"POST / HTTP/1.1\r\nHost: a.b\r\nContent-Length: 5, 6\r\n\r\n", 400, "conflicting"),
    (
        b"POST / HTTP/1.1\r\nHost: a.b\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        400,
        "conflicting",
    ),
    (
        b"POST / HTTP/1.1\r\nHost: a.b\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n",
        400,
        "too large",
    ),
    (
        b"POST / HTTP/1.1\r\nHost: a.b\r\nTransfer-Encoding: gzip\r\n\r\n",
        501,
        "must end in chunked",
    ),
    (
        b"POST / HTTP/1.1\r\nHost: a.b\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        501,
        "must end in chunked",
    ),
    (
        b"POST / HTTP/1.1\r\nHost: a.b\r\nTransfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        400,
        "chunked more than once",
    ),
    (b"POST / HTTP/1.1\r\nHost: a.b\r\nTransfer-Encoding: ,\r\n\r\n", 400, "empty"),
    (b"POST / HTTP/1.0\r\nHost: a.b\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "HTTP/1.0"),
]


@pytest.mark.parametrize(("raw", "status", "fragment"), REFUSED)
def test_refused(raw: bytes, status: int, fragment: str) -> None:
    with pytest.raises(HttpError) as info:
        HeadReader().feed(raw)
    assert info.value.status == status
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_error_sticks() -> None:
    reader = HeadReader()
    with pytest.raises(HttpError) as first:
        reader.feed(b"BAD LINE\r\n")
    with pytest.raises(HttpError) as again:
        reader.feed(b"GET / HTTP/1.1\r\nHost: a.b\r\n\r\n")
    assert again.value is first.value


@pytest.mark.parametrize(
    ("chunks", "status"),
    [
        ([b"GET /" + b"a" * 200], 414),
        ([b"GET /" + b"a" * 50, b"a" * 100], 414),
        ([b"GET /" + b"a" * 200 + b" HTTP/1.1\r\n\r\n"], 414),
        ([b"GET / HTTP/1.1\r\nX: " + b"a" * 200], 431),
        ([b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 40 + b"\r\n"], 431),
        ([b"\r\n" * 200], 414),
    ],
)
def test_size_limits(chunks: list[bytes], status: int) -> None:
    assert run(chunks, max_size=128)[:2] == ("error", status)


def test_head_exactly_at_limit_with_body_after_it() -> None:
    head = b"GET / HTTP/1.1\r\nHost: a.b\r\nX: "
    head += b"y" * (128 - len(head) - 4) + b"\r\n\r\n"
    assert len(head) == 128
    outcome = run([head + b"z" * 1000], max_size=128)
    assert outcome[0] == "head"
    assert outcome[2] == b"z" * 1000
    assert run([head[:-4] + b"y\r\n\r\n"], max_size=128)[:2] == ("error", 431)


def test_incomplete_head_waits() -> None:
    reader = HeadReader()
    assert reader.feed(b"GET / HTTP/1.1\r\nHost: a.b\r\n") is None
    assert reader.feed(b"\r") is None
    assert reader.feed(b"\n") is not None


# -- forwarding ---------------------------------------------------------------------------


def test_forward_head_strips_hop_by_hop_and_closes() -> None:
    head = parse(
        b"POST http://example.org:8080/api?x=1 HTTP/1.1\r\n"
        b"User-Agent: t\r\n"
        b"Connection: keep-alive, X-Secret, content-length\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\n"
        b"Proxy-Authenticate: x\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"TE: trailers\r\n"
        b"Trailer: X-T\r\n"
        b"Upgrade: websocket\r\n"
        b"X-Secret: 1\r\n"
        b"Accept: */*\r\n"
        b"Content-Length: 3\r\n"
        b"\r\n"
    )
    assert forward_head(head) == (
        b"POST /api?x=1 HTTP/1.1\r\n"
        b"Host: example.org:8080\r\n"
        b"User-Agent: t\r\n"
        b"Accept: */*\r\n"
        b"Content-Length: 3\r\n"
        b"Connection: close\r\n"
        b"\r\n"
    )


@pytest.mark.parametrize(
    ("raw", "host_line"),
    [
        (b"GET http://example.org/ HTTP/1.1\r\n\r\n", b"Host: example.org\r\n"),
        (b"GET http://example.org:80/ HTTP/1.0\r\n\r\n", b"Host: example.org\r\n"),
        (b"GET http://[::1]:81/ HTTP/1.1\r\n\r\n", b"Host: [::1]:81\r\n"),
        (b"GET http://[::1]/ HTTP/1.1\r\n\r\n", b"Host: [::1]\r\n"),
        (
            b"GET http://example.org/ HTTP/1.1\r\nHOST: Example.org.\r\n\r\n",
            b"Host: Example.org.\r\n",
        ),
        (b"GET / HTTP/1.1\r\nhost: a.example:8000\r\n\r\n", b"Host: a.example:8000\r\n"),
    ],
)
def test_forward_head_host(raw: bytes, host_line: bytes) -> None:
    out = forward_head(parse(raw))
    assert out.split(b"\r\n", 2)[1] + b"\r\n" == host_line
    assert out.count(b"\r\nHost:") + out.count(b"\r\nhost:") + out.count(b"\r\nHOST:") == 1
    assert out.endswith(b"\r\nConnection: close\r\n\r\n")
    # What we send upstream reads back as the same request.
    again = parse(out)
    assert (again.host, again.port, again.path, again.method) == (
        parse(raw).host,
        parse(raw).port,
        parse(raw).path,
        parse(raw).method,
    )


def test_forward_head_keeps_latin1_bytes_and_version() -> None:
    out = forward_head(parse(b"GET http://a.example/ HTTP/1.0\r\nX: caf\xe9\r\n\r\n"))
    assert out.startswith(b"GET / HTTP/1.0\r\n")
    assert b"X: caf\xe9\r\n" in out


def test_forward_head_refuses_connect() -> None:
    with pytest.raises(ValueError, match="tunnel"):
        forward_head(parse(b"CONNECT a.example:443 HTTP/1.1\r\n\r\n"))


# -- responses ----------------------------------------------------------------------------


def test_response() -> None:
    out = response(403, "Forbidden", "blocked: é\n", [("X-Corral-Rule", "net-deny")])
    head, _, body = out.partition(b"\r\n\r\n")
    assert body == "blocked: é\n".encode()
    assert head.split(b"\r\n") == [
        b"HTTP/1.1 403 Forbidden",
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Length: " + str(len(body)).encode(),
        b"Connection: close",
        b"X-Corral-Rule: net-deny",
    ]
    assert response(200, "OK").endswith(b"Content-Length: 0\r\nConnection: close\r\n\r\n")


@pytest.mark.parametrize(
    ("status", "reason", "headers"),
    [
        (99, "x", []),
        (600, "x", []),
        (400, "Bad\r\nX-Injected: 1", []),
        (400, "Bad", [("X", "a\nb")]),
        (400, "Bad", [("Bad Name", "v")]),
    ],
)
def test_response_refuses_injection(
    status: int, reason: str, headers: list[tuple[str, str]]
) -> None:
    with pytest.raises(ValueError):
        response(status, reason, "", headers)


# -- host names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("example.org", True),
        ("example.org.", True),
        ("_sip._tcp.example.com", True),
        ("xn--bcher-kva.example", True),
        ("localhost", True),
        ("1.2.3.4", True),
        ("::1", True),
        ("a" * 63 + ".org", True),
        ("a" * 64 + ".org", False),
        (".".join(["a" * 49] * 5) + ".a", True),  # 251 characters
        (".".join(["a" * 50] * 5) + ".ab", False),  # 257 characters
        ("", False),
        (".", False),
        ("a..b", False),
        ("-.b", True),
        ("exa mple.org", False),
        ("ex*ample.org", False),
        ("exämple.org", False),
        ("127.1", False),
        ("1.2.3.4.5", False),
        ("foo.123", False),
        ("0x7f.0x1", False),
        ("fe80::1%eth0", False),
        ("1.2.3.4.", False),
    ],
)
def test_valid_host(name: str, ok: bool) -> None:
    assert valid_host(name) is ok


# -- fuzzing ------------------------------------------------------------------------------

SAMPLES: list[bytes] = [raw for raw, *_ in ACCEPTED] + [
    b"POST http://example.org/up HTTP/1.1\r\nHost: example.org\r\nContent-Length: 3\r\n\r\nabc",
    b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example\r\nUser-Agent: curl\r\n\r\n\x16\x03\x01",
]


def check_head(head: RequestHead) -> None:
    """Invariants every returned head must hold, whatever bytes produced it."""
    assert valid_host(head.host)
    assert 1 <= head.port <= 65535
    assert head.version in ("HTTP/1.1", "HTTP/1.0")
    assert head.method and " " not in head.method
    if head.is_connect:
        assert head.path == ""
    else:
        assert head.path.startswith("/")
    for name, value in head.headers:
        assert name and ":" not in name
        assert "\r" not in value and "\n" not in value and "\x00" not in value
        assert value == value.strip(" \t")
    # What the proxy would send upstream parses back to the same destination.
    if not head.is_connect:
        again = parse(forward_head(head))
        assert (again.host, again.port, again.path) == (head.host, head.port, head.path)


@pytest.mark.parametrize("raw", SAMPLES)
def test_every_split_point_gives_the_same_result(raw: bytes) -> None:
    whole = run([raw])
    assert whole[0] == "head"
    for cut in range(len(raw) + 1):
        assert run([raw[:cut], raw[cut:]]) == whole
    assert run([bytes([b]) for b in raw]) == whole


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 1000), max_size=6))
def test_fuzz_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    whole = run([data], max_size=200)
    assert run(split(data, cuts), max_size=200) == whole
    if whole[0] == "head":
        assert isinstance(whole[1], RequestHead)
        check_head(whole[1])


REQUEST_LINES = [
    b"GET http://example.org/ HTTP/1.1",
    b"CONNECT example.org:443 HTTP/1.1",
    b"GET / HTTP/1.1",
    b"POST http://[::1]:8080/x HTTP/1.0",
]
# Arbitrary bytes that stay one non-empty line, so the head ends where the test says.
ONE_LINE = st.binary(min_size=1, max_size=30).filter(lambda b: b"\n" not in b and b != b"\r")
HEADER_LINES = [
    b"Host: example.org",
    b"Host: example.org:443",
    b"Host: [::1]:8080",
    b"Content-Length: 3",
    b"Transfer-Encoding: chunked",
    b"Connection: x-a, keep-alive",
    b"X-A: b",
    b" folded",
    b"Bad Name: x",
]


@settings(max_examples=200, deadline=None)
@given(
    line=st.sampled_from(REQUEST_LINES) | ONE_LINE,
    headers=st.lists(st.sampled_from(HEADER_LINES) | ONE_LINE, max_size=5),
    eol=st.sampled_from([b"\r\n", b"\n"]),
    tail=st.binary(max_size=10),
    cuts=st.lists(st.integers(0, 1000), max_size=4),
)
def test_fuzz_structured(
    line: bytes, headers: list[bytes], eol: bytes, tail: bytes, cuts: list[int]
) -> None:
    data = eol.join([line, *headers]) + eol + eol + tail
    whole = run([data])
    assert run(split(data, cuts)) == whole
    if whole[0] == "head":
        assert isinstance(whole[1], RequestHead)
        check_head(whole[1])
        assert whole[2] == tail
    else:
        assert whole[0] == "error"
        assert whole[1] in (400, 414, 431, 501, 505)


LABEL = st.text("abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=10)
PATHS = st.text("abcXYZ0189/?=&%._~-", max_size=20).map(lambda p: "/" + p)
HOSTS = st.lists(LABEL, min_size=1, max_size=4).map(lambda labels: ".".join([*labels, "example"]))


@settings(max_examples=120, deadline=None)
@given(
    host=HOSTS,
    port=st.integers(1, 65535),
    path=PATHS,
    connect=st.booleans(),
    cuts=st.lists(st.integers(0, 1000), max_size=4),
)
def test_fuzz_valid_requests(
    host: str, port: int, path: str, connect: bool, cuts: list[int]
) -> None:
    if connect:
        raw = f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host.upper()}:{port}\r\n\r\n".encode()
    else:
        raw = f"GET http://{host}:{port}{path} HTTP/1.1\r\nHost: {host}.:{port}\r\n\r\n".encode()
    whole = run([raw])
    assert whole[0] == "head"
    head = whole[1]
    assert isinstance(head, RequestHead)
    assert (head.host, head.port) == (host, port)
    assert head.path == ("" if connect else path)
    check_head(head)
    assert run(split(raw, cuts)) == whole


@pytest.mark.parametrize(
    ("body", "end"),
    [
        (b"0\r\n\r\n", 5),
        (b"5\r\nhello\r\n0\r\n\r\nGET /next HTTP/1.1\r\n\r\n", 15),
        (b"5;ext=1\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\nmore", 35),
        (b"a\r\n0123456789\r\n0\n\n", 18),  # bare LF tolerated
    ],
)
def test_chunked_body_end_is_found_at_every_split(body: bytes, end: int) -> None:
    from corral.egress.http1 import ChunkedBody

    for cut in range(len(body) + 1):
        tracker = ChunkedBody()
        first = tracker.feed(body[:cut])
        if first is not None:
            assert first == end
            continue
        second = tracker.feed(body[cut:])
        assert second is not None and cut + second == end


@pytest.mark.parametrize("body", [b"zz\r\n", b"-5\r\n", b"3\r\nhello\r\n"])
def test_malformed_chunked_bodies_are_refused(body: bytes) -> None:
    from corral.egress.http1 import ChunkedBody, HttpError

    with pytest.raises(HttpError):
        ChunkedBody().feed(body)
