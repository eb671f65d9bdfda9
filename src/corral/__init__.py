"""corral: contain autonomous AI agents."""

from typing import TYPE_CHECKING, Any

from corral.model import (
    Action,
    ActionKind,
    Alert,
    AuditVerdict,
    Category,
    Decision,
    Event,
    EventKind,
    Severity,
    Verdict,
)
from corral.policy import Policy

if TYPE_CHECKING:
    from corral.sandbox import Result, Sandbox

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The sandbox pulls in subprocess plumbing and libseccomp; `corral check` never needs
    # them, so they load on first use of corral.Sandbox.
    if name in ("Sandbox", "Result"):
        from corral import sandbox

        return getattr(sandbox, name)
    raise AttributeError(f"module 'corral' has no attribute {name!r}")


__all__ = [
    "Action",
    "ActionKind",
    "Alert",
    "AuditVerdict",
    "Category",
    "Decision",
    "Event",
    "EventKind",
    "Policy",
    "Result",
    "Sandbox",
    "Severity",
    "Verdict",
    "__version__",
]
