"""Peeking at TLS ClientHellos: real ones from the ssl module, hand-built malformed ones,
fragmentation across records, and fuzzing."""

from __future__ import annotations

import functools
import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.egress.http1 import valid_host
from corral.egress.tls import Hello, peek_client_hello

# -- building ClientHellos ----------------------------------------------------------------


@functools.cache
def real_hello(server_hostname: str | None, alpn: tuple[str, ...] = ()) -> bytes:
    """The first flight of Python's own TLS client: one record holding the ClientHello."""
    context = ssl.create_default_context()
    if server_hostname is None:
        context.check_hostname = False
    if alpn:
        context.set_alpn_protocols(list(alpn))
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def vec16(data: bytes) -> bytes:
    return u16(len(data)) + data


def sni_ext(*names: tuple[int, bytes]) -> bytes:
    return vec16(b"".join(bytes([kind]) + vec16(name) for kind, name in names))


def alpn_ext(*protocols: bytes) -> bytes:
    return vec16(b"".join(bytes([len(p)]) + p for p in protocols))


def extensions(*items: tuple[int, bytes]) -> bytes:
    return b"".join(u16(kind) + vec16(data) for kind, data in items)


def client_hello(
    ext_block: bytes | None = None,
    *,
    session_id: bytes = b"",
    suites: bytes = b"\x13\x01\x13\x02",
    compression: bytes = b"\x00",
    msg_type: int = 1,
    trailing: bytes = b"",
    length_delta: int = 0,
) -> bytes:
    """A handshake message (type + 24-bit length + body); ``ext_block`` is the content of
    the extensions vector (None: no extensions at all)."""
    body = b"\x03\x03" + bytes(range(32))
    body += bytes([len(session_id)]) + session_id
    body += vec16(suites)
    body += bytes([len(compression)]) + compression
    if ext_block is not None:
        body += vec16(ext_block)
    body += trailing
    return bytes([msg_type]) + (len(body) + length_delta).to_bytes(3, "big") + body


def records(handshake: bytes, size: int = 2**14, content_type: int = 0x16) -> bytes:
    """``handshake`` cut into TLS records of at most ``size`` bytes."""
    out = b""
    for at in range(0, len(handshake), size):
        chunk = handshake[at : at + size]
        out += bytes([content_type, 3, 1]) + u16(len(chunk)) + chunk
    return out


def strip_record(data: bytes) -> bytes:
    """The handshake bytes of a single-record first flight."""
    assert data[0] == 0x16 and len(data) == 5 + int.from_bytes(data[3:5], "big")
    return data[5:]


def named(name: bytes, *more: tuple[int, bytes]) -> bytes:
    return records(client_hello(extensions((0, sni_ext((0, name))), *more)))


# -- real ClientHellos --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("server_hostname", "alpn", "sni"),
    [
        ("example.org", (), "example.org"),
        ("Example.ORG.", (), "example.org"),
        ("xn--bcher-kva.example", (), "xn--bcher-kva.example"),
        ("a-b_c.d.example", ("h2", "http/1.1"), "a-b_c.d.example"),
        ("1.2.3.4", (), None),
        ("::1", ("http/1.1",), None),
        (None, (), None),
    ],
)
def test_real_client_hellos(
    server_hostname: str | None, alpn: tuple[str, ...], sni: str | None
) -> None:
    data = real_hello(server_hostname, alpn)
    assert peek_client_hello(data) == Hello(complete=True, is_tls=True, sni=sni, alpn=alpn)
    # Whatever follows the ClientHello does not change what it says.
    assert peek_client_hello(data + b"\x14\x03\x03\x00\x01\x01") == peek_client_hello(data)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 100, 300])
def test_hello_fragmented_across_records(size: int) -> None:
    data = records(strip_record(real_hello("example.org", ("h2",))), size)
    assert peek_client_hello(data) == Hello(True, True, "example.org", ("h2",))


def test_every_prefix_waits_and_the_whole_completes() -> None:
    for data in (
        real_hello("example.org", ("h2", "http/1.1")),
        records(strip_record(real_hello("example.org")), 50),
    ):
        whole = peek_client_hello(data)
        assert whole.complete and whole.sni == "example.org"
        for cut in range(len(data)):
            assert peek_client_hello(data[:cut]) == Hello(complete=False, is_tls=True, sni=None)


# -- not TLS ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"\x16\x02\x00",
        b"\x16\x00",
        b"\x17\x03\x03\x00\x10",
        b"\x80\x2e\x01\x03\x01",  # SSLv2-compatible ClientHello
        b"\x00",
    ],
)
def test_not_tls(data: bytes) -> None:
    assert peek_client_hello(data) == Hello(complete=True, is_tls=False, sni=None)


@pytest.mark.parametrize("data", [b"", b"\x16", b"\x16\x03", b"\x16\x03\x01\x02"])
def test_too_short_to_tell(data: bytes) -> None:
    assert peek_client_hello(data) == Hello(complete=False, is_tls=True, sni=None)


# -- size limit ---------------------------------------------------------------------------


def test_gives_up_past_max_size() -> None:
    data = real_hello("example.org")
    assert peek_client_hello(data, max_size=len(data)).sni == "example.org"
    # The announced length cannot fit: no point waiting.
    early = peek_client_hello(data[:20], max_size=len(data) - 1)
    assert early.complete and early.is_tls and early.sni is None
    assert early.error is not None and "first" in early.error
    # Lengths that could fit, but more than max_size bytes arrive without a ClientHello.
    padded = records(client_hello(extensions((0x15, bytes(2900)))), 10)
    assert len(padded) > 4001
    assert not peek_client_hello(padded[:4000], max_size=4000).complete
    gave_up = peek_client_hello(padded[:4001], max_size=4000)
    assert (gave_up.complete, gave_up.is_tls, gave_up.sni) == (True, True, None)
    assert gave_up.error == "no complete ClientHello within the first 4000 bytes"


def test_large_post_quantum_sized_hello() -> None:
    big = client_hello(extensions((0x33, bytes(1200)), (0, sni_ext((0, b"big.example")))))
    assert len(big) > 1200
    assert peek_client_hello(records(big, 512)).sni == "big.example"


# -- hand-built ClientHellos --------------------------------------------------------------

HAND_BUILT: list[tuple[bytes, str | None, tuple[str, ...]]] = [
    (named(b"example.org"), "example.org", ()),
    (named(b"EXAMPLE.org."), "example.org", ()),
    (records(client_hello()), None, ()),  # no extensions at all (before TLS 1.2)
    (records(client_hello(b"")), None, ()),
    (records(client_hello(extensions((0x2B, b"\x02\x03\x04"))), 7), None, ()),
    (
        named(b"a.example", (16, alpn_ext(b"h2", b"\xfa\xfa")), (0xFAFA, b"")),
        "a.example",
        ("h2", "\\xfa\\xfa"),
    ),
    # Name types other than host_name are skipped.
    (
        records(client_hello(extensions((0, sni_ext((1, b"xx"), (0, b"a.example")))))),
        "a.example",
        (),
    ),
    (records(client_hello(extensions((0, sni_ext((1, b"xx")))))), None, ()),
    (records(client_hello(session_id=bytes(32))), None, ()),
]


@pytest.mark.parametrize(("data", "sni", "alpn"), HAND_BUILT, ids=range(len(HAND_BUILT)))
def test_hand_built(data: bytes, sni: str | None, alpn: tuple[str, ...]) -> None:
    assert peek_client_hello(data) == Hello(True, True, sni, alpn)


MALFORMED: list[tuple[bytes, str]] = [
    (records(client_hello(msg_type=2)), "type 2, not 1"),
    (records(client_hello(length_delta=-1)), "legacy_compression_methods runs past the end"),
    (records(client_hello(trailing=b"\x00")), "length of extensions runs past the end"),
    (records(client_hello(b"", trailing=b"\x00")), "ClientHello: 1 byte left over"),
    (records(client_hello(extensions(), length_delta=-40)), "runs past the end"),
    (records(client_hello(session_id=bytes(33))), "legacy_session_id is longer than 32"),
    (records(client_hello(suites=b"\x13\x01\x13")), "odd length"),
    (records(client_hello(suites=b"")), "cipher_suites is shorter"),
    (records(client_hello(compression=b"")), "legacy_compression_methods is shorter"),
    (records(client_hello(b"\x00\x00\x00")), "runs past the end"),
    (records(client_hello(b"\x00\x00\x00\x05\x00")), "runs past the end"),
    (named(b"a.example", (0, sni_ext((0, b"b.example")))), "extension 0 twice"),
    (records(client_hello(extensions((0, b"")))), "runs past the end"),
    (records(client_hello(extensions((0, vec16(b""))))), "server_name_list is shorter"),
    (records(client_hello(extensions((0, sni_ext((0, b"")))))), "name is shorter"),
    (records(client_hello(extensions((0, sni_ext((0, b"a.b")) + b"x")))), "left over"),
    (records(client_hello(extensions((0, sni_ext((0, b"a.b"), (0, b"c.d")))))), "more than one"),
    (named(b"exa\xe4mple.org"), "not ASCII"),
    (named(b"exa mple.org"), "not a valid host name"),
    (named(b"a..b"), "not a valid host name"),
    (named(b"1.2.3.4"), "is an IP address"),
    (named(b"::1"), "is an IP address"),
    (named(b"a.example", (16, alpn_ext())), "protocol_name_list is shorter"),
    (named(b"a.example", (16, alpn_ext(b"h2", b""))), "protocol name is shorter"),
    (named(b"a.example", (16, alpn_ext(b"h2") + b"!")), "left over"),
    (named(b"a.example", (16, vec16(b"\x05h2"))), "runs past the end"),
    (records(client_hello()[:10]) + records(b"x", content_type=0x17), "content type 23"),
    (records(client_hello()[:10]) + b"\x16\x02\x00\x00\x01x", "version 2.0 is not 3.x"),
    (b"\x16\x03\x01\x00\x00", "length 0"),
    (b"\x16\x03\x01\x40\x01", "length 16385"),
]


@pytest.mark.parametrize(("data", "fragment"), MALFORMED, ids=[f for _, f in MALFORMED])
def test_malformed(data: bytes, fragment: str) -> None:
    hello = peek_client_hello(data)
    assert (hello.complete, hello.is_tls, hello.sni, hello.alpn) == (True, True, None, ())
    assert hello.error is not None
    assert fragment in hello.error


# -- fuzzing ------------------------------------------------------------------------------


def check(hello: Hello, data: bytes) -> None:
    """Invariants of every answer."""
    if not hello.complete:
        assert hello.is_tls and hello.sni is None and hello.alpn == () and hello.error is None
    if not hello.is_tls:
        assert hello.complete and hello.error is None
        assert data[:1] != b"\x16" or data[1:2] != b"\x03"
    if hello.sni is not None:
        assert valid_host(hello.sni)
        assert hello.sni == hello.sni.lower() and not hello.sni.endswith(".")
        assert hello.error is None
    if hello.error is not None:
        assert hello.complete and hello.is_tls and hello.sni is None


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200) | st.binary(max_size=200).map(lambda b: b"\x16\x03" + b))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    check(peek_client_hello(data, max_size=150), data)


@settings(max_examples=200, deadline=None)
@given(
    which=st.sampled_from([("example.org", ("h2", "http/1.1")), ("1.2.3.4", ()), ("x.y", ())]),
    edits=st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_fuzz_mutated_real_hellos(
    which: tuple[str, tuple[str, ...]], edits: list[tuple[int, int]]
) -> None:
    data = bytearray(real_hello(*which))
    for at, value in edits:
        data[at % len(data)] = value
    check(peek_client_hello(bytes(data)), bytes(data))


@settings(max_examples=200, deadline=None)
@given(
    cuts=st.lists(st.integers(1, 600), max_size=5),
    tail=st.binary(max_size=20),
)
def test_fuzz_fragmented_real_hello(cuts: list[int], tail: bytes) -> None:
    """Cut the handshake into records at arbitrary points: every prefix of the records
    waits, the whole says the same as the unfragmented ClientHello."""
    handshake = strip_record(real_hello("example.org", ("h2", "http/1.1")))
    points = sorted({c % len(handshake) for c in cuts} - {0})
    pieces = [handshake[a:b] for a, b in zip([0, *points], [*points, len(handshake)], strict=True)]
    data = b"".join(records(piece) for piece in pieces)
    assert peek_client_hello(data + tail) == Hello(True, True, "example.org", ("h2", "http/1.1"))
    assert not peek_client_hello(data[: len(data) - 1]).complete
