"""The tamper-evident ledger."""

from corral.ledger.chain import (
    HASH_PREFIX,
    ChainChecker,
    LedgerRecord,
    VerifyReport,
    canonical_json,
    genesis_hash,
    record_hash,
    sha256_hex,
)
from corral.ledger.labelled import LabelledLedger
from corral.ledger.merge import HostRecord, MergedLedger, find_ledgers
from corral.ledger.store import (
    KIND_ALERT,
    KIND_DECISION,
    KIND_EVENT,
    KIND_NOTE,
    Durability,
    Ledger,
)
from corral.ledger.verify import SCHEMA_VERSION, verify_path

__all__ = [
    "HASH_PREFIX",
    "KIND_ALERT",
    "KIND_DECISION",
    "KIND_EVENT",
    "KIND_NOTE",
    "SCHEMA_VERSION",
    "ChainChecker",
    "Durability",
    "HostRecord",
    "LabelledLedger",
    "Ledger",
    "LedgerRecord",
    "MergedLedger",
    "VerifyReport",
    "canonical_json",
    "find_ledgers",
    "genesis_hash",
    "record_hash",
    "sha256_hex",
    "verify_path",
]
