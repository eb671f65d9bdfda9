"""SOCKS5 server side: greeting, CONNECT requests, refusals, and fuzzing of the reader."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.egress.http1 import valid_host
from corral.egress.socks5 import (
    REPLY_ADDRESS_NOT_SUPPORTED,
    REPLY_COMMAND_NOT_SUPPORTED,
    REPLY_GENERAL_FAILURE,
    REPLY_NOT_ALLOWED,
    REPLY_SUCCEEDED,
    Socks5Reader,
    SocksError,
    SocksRequest,
    reply,
)

GREETING = b"\x05\x01\x00"
METHOD_OK = b"\x05\x00"
SOCKS4_REJECT = b"\x00\x5b\x00\x00\x00\x00\x00\x00"

Outcome = tuple[str, bytes, object, bytes]


def connect(atyp: int, address: bytes, port: int, cmd: int = 1) -> bytes:
    return bytes([5, cmd, 0, atyp]) + address + port.to_bytes(2, "big")


def name(host: bytes, port: int = 443) -> bytes:
    return connect(3, bytes([len(host)]) + host, port)


def run(chunks: list[bytes]) -> Outcome:
    """Feed ``chunks`` one by one: ("request", sent, request, rest), ("error", sent +
    error reply, message, b"") or ("incomplete", sent, None, b"")."""
    reader = Socks5Reader()
    sent = b""
    request = None
    try:
        for chunk in chunks:
            out, request = reader.feed(chunk)
            sent += out
    except SocksError as exc:
        return ("error", sent + exc.reply, str(exc), b"")
    if request is None:
        return ("incomplete", sent, None, b"")
    return ("request", sent, request, reader.rest)


# -- accepted -----------------------------------------------------------------------------

ACCEPTED: list[tuple[bytes, SocksRequest]] = [
    (name(b"example.org"), SocksRequest("example.org", 443, True)),
    (name(b"Example.ORG.", 80), SocksRequest("example.org", 80, True)),
    (name(b"_sip._tcp.example.com", 5060), SocksRequest("_sip._tcp.example.com", 5060, True)),
    (name(b"a" * 63 + b"." + b"b" * 63, 1), SocksRequest("a" * 63 + "." + "b" * 63, 1, True)),
    (name(b"1.2.3.4"), SocksRequest("1.2.3.4", 443, True)),
    (connect(1, bytes([93, 184, 215, 14]), 443), SocksRequest("93.184.215.14", 443, False)),
    (connect(1, bytes(4), 65535), SocksRequest("0.0.0.0", 65535, False)),
    (connect(4, bytes(15) + b"\x01", 22), SocksRequest("::1", 22, False)),
    (
        connect(4, bytes.fromhex("20010db8000000000000000000000001"), 443),
        SocksRequest("2001:db8::1", 443, False),
    ),
    (
        connect(4, bytes.fromhex("00000000000000000000ffff7f000001"), 80),
        SocksRequest("127.0.0.1", 80, False),
    ),
]


@pytest.mark.parametrize(("request_bytes", "expected"), ACCEPTED)
def test_accepted(request_bytes: bytes, expected: SocksRequest) -> None:
    reader = Socks5Reader()
    assert reader.feed(GREETING) == (METHOD_OK, None)
    assert reader.feed(request_bytes) == (b"", expected)
    assert reader.rest == b""


@pytest.mark.parametrize(
    "greeting",
    [
        b"\x05\x01\x00",
        b"\x05\x02\x02\x00",
        b"\x05\x03\x01\x02\x00",
        b"\x05\xff" + bytes(range(255)),
    ],
)
def test_greetings_offering_no_auth(greeting: bytes) -> None:
    assert Socks5Reader().feed(greeting) == (METHOD_OK, None)


def test_request_sent_with_greeting_and_data_after_it() -> None:
    reader = Socks5Reader()
    out, request = reader.feed(GREETING + name(b"example.org") + b"\x16\x03\x01")
    assert out == METHOD_OK
    assert request == SocksRequest("example.org", 443, True)
    assert reader.rest == b"\x16\x03\x01"
    assert reader.feed(b"more") == (b"", request)
    assert reader.rest == b"\x16\x03\x01more"


def test_incomplete_waits() -> None:
    reader = Socks5Reader()
    assert reader.feed(b"") == (b"", None)
    assert reader.feed(b"\x05") == (b"", None)
    assert reader.feed(b"\x02\x00") == (b"", None)
    assert reader.feed(b"\x02") == (METHOD_OK, None)
    assert reader.feed(b"\x05\x01\x00\x03\x0bexample.or") == (b"", None)
    assert reader.feed(b"g\x01") == (b"", None)
    assert reader.feed(b"\xbb") == (b"", SocksRequest("example.org", 443, True))


# -- refused ------------------------------------------------------------------------------

GENERAL = reply(REPLY_GENERAL_FAILURE)

REFUSED: list[tuple[bytes, bytes, str]] = [
    (b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00", SOCKS4_REJECT, "SOCKS4 is not supported"),
    (b"\x04", SOCKS4_REJECT, "SOCKS4"),
    (b"GET / HTTP/1.1\r\n", b"", "looks like HTTP"),
    (b"\x16\x03\x01", b"", "not a SOCKS5 client (first byte 0x16)"),
    (b"\x05\x00", b"\x05\xff", "no authentication"),
    (b"\x05\x01\x02", b"\x05\xff", "username or password"),
    (b"\x05\x02\x01\x02", b"\x05\xff", "no authentication"),
    (GREETING + b"\x04\x01\x00\x01", METHOD_OK + GENERAL, "version 4"),
    (
        GREETING + connect(1, bytes(4), 80, cmd=2),
        METHOD_OK + reply(REPLY_COMMAND_NOT_SUPPORTED),
        "BIND",
    ),
    (
        GREETING + connect(1, bytes(4), 80, cmd=3),
        METHOD_OK + reply(REPLY_COMMAND_NOT_SUPPORTED),
        "UDP ASSOCIATE",
    ),
    (GREETING + b"\x05\x09", METHOD_OK + reply(REPLY_COMMAND_NOT_SUPPORTED), "command 0x09"),
    (GREETING + b"\x05\x01\x01", METHOD_OK + GENERAL, "reserved byte"),
    (GREETING + b"\x05\x01\x00\x02", METHOD_OK + reply(REPLY_ADDRESS_NOT_SUPPORTED), "0x02"),
    (GREETING + b"\x05\x01\x00\x05", METHOD_OK + reply(REPLY_ADDRESS_NOT_SUPPORTED), "0x05"),
    (GREETING + b"\x05\x01\x00\x03\x00", METHOD_OK + GENERAL, "empty domain name"),
    (GREETING + name(b"ex ample.org"), METHOD_OK + GENERAL, "not a valid host name"),
    (GREETING + name(b"exa\xe4mple.org"), METHOD_OK + GENERAL, "not ASCII"),
    (GREETING + name(b"a..b"), METHOD_OK + GENERAL, "not a valid host name"),
    (GREETING + name(b"127.1"), METHOD_OK + GENERAL, "not a valid host name"),
    (GREETING + name(b"[::1]"), METHOD_OK + GENERAL, "not a valid host name"),
    (GREETING + name(b"a" * 64 + b".org"), METHOD_OK + GENERAL, "not a valid host name"),
    (GREETING + name(b"example.org", 0), METHOD_OK + GENERAL, "port 0"),
    (GREETING + connect(1, bytes([10, 0, 0, 1]), 0), METHOD_OK + GENERAL, "port 0"),
]


@pytest.mark.parametrize(("data", "sent", "fragment"), REFUSED)
def test_refused(data: bytes, sent: bytes, fragment: str) -> None:
    outcome = run([data])
    assert outcome[:2] == ("error", sent)
    assert isinstance(outcome[2], str)
    assert fragment in outcome[2]


def test_refusal_after_separate_greeting_has_only_the_failure_reply() -> None:
    reader = Socks5Reader()
    assert reader.feed(GREETING) == (METHOD_OK, None)
    with pytest.raises(SocksError) as info:
        reader.feed(connect(1, bytes(4), 80, cmd=2))
    assert info.value.reply == reply(REPLY_COMMAND_NOT_SUPPORTED)
    assert isinstance(info.value, ValueError)
    with pytest.raises(SocksError) as again:
        reader.feed(b"anything")
    assert again.value is info.value


# -- replies ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((REPLY_SUCCEEDED,), b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"),
        ((REPLY_NOT_ALLOWED, "10.1.2.3", 8080), b"\x05\x02\x00\x01\x0a\x01\x02\x03\x1f\x90"),
        ((REPLY_SUCCEEDED, "::1", 443), b"\x05\x00\x00\x04" + bytes(15) + b"\x01\x01\xbb"),
        ((REPLY_SUCCEEDED, "proxy.local", 1), b"\x05\x00\x00\x03\x0bproxy.local\x00\x01"),
    ],
)
def test_reply(args: tuple[int, str, int], expected: bytes) -> None:
    assert reply(*args) == expected


@pytest.mark.parametrize(
    ("code", "host", "port"),
    [(256, "0.0.0.0", 0), (-1, "0.0.0.0", 0), (0, "0.0.0.0", 65536), (0, "", 0)],
)
def test_reply_refuses_bad_arguments(code: int, host: str, port: int) -> None:
    with pytest.raises(ValueError):
        reply(code, host, port)


# -- fuzzing ------------------------------------------------------------------------------

SAMPLES = [GREETING + raw for raw, _ in ACCEPTED] + [
    b"\x05\x02\x02\x00" + name(b"example.org") + b"tail",
    *(data for data, _, _ in REFUSED),
]


@pytest.mark.parametrize("data", SAMPLES)
def test_every_split_point_gives_the_same_result(data: bytes) -> None:
    whole = run([data])
    assert whole[0] != "incomplete"
    for cut in range(len(data) + 1):
        assert run([data[:cut], data[cut:]]) == whole
    assert run([bytes([b]) for b in data]) == whole


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def check(outcome: Outcome) -> None:
    kind, sent, request, _ = outcome
    if kind == "request":
        assert isinstance(request, SocksRequest)
        assert valid_host(request.host)
        assert request.host == request.host.lower()
        assert not request.host.endswith(".")
        assert 1 <= request.port <= 65535
        assert sent == METHOD_OK
    elif kind == "error":
        assert sent == b"" or sent[:1] in (b"\x00", b"\x05")
    else:
        assert sent in (b"", METHOD_OK)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=64), cuts=st.lists(st.integers(0, 100), max_size=5))
def test_fuzz_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    whole = run([data])
    check(whole)
    assert run(split(data, cuts)) == whole


@settings(max_examples=200, deadline=None)
@given(
    cmd=st.sampled_from([1, 1, 1, 2, 3, 0]),
    rsv=st.sampled_from([0, 0, 0, 1]),
    atyp=st.sampled_from([1, 3, 3, 4, 2]),
    address=st.binary(max_size=20)
    | st.sampled_from([b"example.org", b"EXAMPLE.org.", b"a-b_c.d", b"::1", b"1.2.3.4"]),
    port=st.integers(0, 65535),
    tail=st.binary(max_size=5),
    cuts=st.lists(st.integers(0, 100), max_size=5),
)
def test_fuzz_structured(
    cmd: int, rsv: int, atyp: int, address: bytes, port: int, tail: bytes, cuts: list[int]
) -> None:
    body = bytes([len(address)]) + address if atyp == 3 else address
    data = GREETING + bytes([5, cmd, rsv, atyp]) + body + port.to_bytes(2, "big") + tail
    whole = run([data])
    check(whole)
    assert run(split(data, cuts)) == whole
    if whole[0] == "request" and len(address) == {1: 4, 4: 16}.get(atyp, len(address)):
        assert whole[3] == tail


LABELS = st.text("abcdefghijklmnopqrstuvwxyzABC0123456789_-", min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(
    labels=st.lists(LABELS, min_size=1, max_size=4),
    port=st.integers(1, 65535),
    cuts=st.lists(st.integers(0, 100), max_size=5),
)
def test_fuzz_valid_names(labels: list[str], port: int, cuts: list[int]) -> None:
    host = ".".join([*labels, "example"])
    data = GREETING + name(host.encode(), port)
    whole = run(split(data, cuts))
    assert whole == ("request", METHOD_OK, SocksRequest(host.lower(), port, True), b"")
