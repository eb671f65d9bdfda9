"""corral: contain autonomous AI agents."""

from corral.model import (
    Action,
    ActionKind,
    Alert,
    Category,
    Decision,
    Event,
    EventKind,
    Severity,
    Verdict,
)
from corral.policy import Policy

__version__ = "0.1.0"

__all__ = [
    "Action",
    "ActionKind",
    "Alert",
    "Category",
    "Decision",
    "Event",
    "EventKind",
    "Policy",
    "Severity",
    "Verdict",
    "__version__",
]
