"""Audit: a second, independent reviewer that judges each action against the agent's task.

from corral.audit import RuleAuditor, load_trajectory, audit_trajectory
report = audit_trajectory(RuleAuditor(), load_trajectory("run.jsonl"))
report.suspicion, [v.step for v in report.flagged]
"""

from corral.audit.ensemble import Ensemble
from corral.audit.llm import LLMAuditor, LLMConfig
from corral.audit.protocol import Auditor, Thresholds
from corral.audit.review import (
    AUDITORS,
    TrajectoryReport,
    aaudit_trajectory,
    audit_trajectory,
    make_auditor,
)
from corral.audit.rules import RuleAuditor, load_audit_rules
from corral.audit.trajectory import Step, Trajectory, load_trajectory, parse_trajectory

__all__ = [
    "AUDITORS",
    "Auditor",
    "Ensemble",
    "LLMAuditor",
    "LLMConfig",
    "RuleAuditor",
    "Step",
    "Thresholds",
    "Trajectory",
    "TrajectoryReport",
    "aaudit_trajectory",
    "audit_trajectory",
    "load_audit_rules",
    "load_trajectory",
    "make_auditor",
    "parse_trajectory",
]
