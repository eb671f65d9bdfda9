"""The red-team harness: real attacks in real sandboxes, canaries outside."""

from corral.redteam.canaries import Canaries, Hit
from corral.redteam.harness import (
    Attack,
    Outcome,
    load_attacks,
    redteam_policy,
    retarget,
    run_attacks,
    summarize,
)

__all__ = [
    "Attack",
    "Canaries",
    "Hit",
    "Outcome",
    "load_attacks",
    "redteam_policy",
    "retarget",
    "run_attacks",
    "summarize",
]
