"""Policy: schema, loading, presets, shell parsing and the gate."""

from corral.policy.loader import ResolvedPolicy, load_policy, load_policy_data, preset_names
from corral.policy.policy import Policy
from corral.policy.schema import HostPattern, PolicySpec

__all__ = [
    "HostPattern",
    "Policy",
    "PolicySpec",
    "ResolvedPolicy",
    "load_policy",
    "load_policy_data",
    "preset_names",
]
