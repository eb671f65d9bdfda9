"""Exception hierarchy. Verdicts are data (``Decision``); exceptions are for a broken
configuration, a broken ledger or a bug. Each also inherits the builtin it resembles so
callers that catch ``ValueError`` or ``OSError`` keep working."""

from __future__ import annotations


class CorralError(Exception):
    """Root of every error corral raises on purpose."""


class PolicyError(CorralError, ValueError):
    """A policy file is invalid. The message names the file, line and key."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        key: str | None = None,
    ) -> None:
        self.file = file
        self.line = line
        self.key = key
        self.detail = message
        where = file or "<policy>"
        if line is not None:
            where += f":{line}"
        if key:
            where += f": {key}"
        super().__init__(f"{where}: {message}")


class RuleError(PolicyError):
    """A rule data file shipped with corral (or given by the user) is invalid."""


class LedgerError(CorralError, OSError):
    """The ledger cannot be opened or written."""


class LedgerIntegrityError(LedgerError):
    """The ledger's hash chain is broken; ``seq`` is the first bad record."""

    def __init__(self, message: str, seq: int | None = None) -> None:
        self.seq = seq
        super().__init__(message)


class TrajectoryError(CorralError, ValueError):
    """A trajectory file cannot be read. The message names the file, line and key."""

    def __init__(
        self, message: str, *, file: str, line: int | None = None, key: str | None = None
    ) -> None:
        self.file = file
        self.line = line
        self.key = key
        where = file + (f":{line}" if line is not None else "")
        if key:
            where += f": {key}"
        super().__init__(f"{where}: {message}")


class AuditorError(CorralError, RuntimeError):
    """An auditor is misconfigured (no endpoint, an unknown aggregation, ...)."""
