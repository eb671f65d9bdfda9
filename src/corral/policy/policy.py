"""``Policy``: a resolved, validated policy with a stable identity (``hash``).

The hash is what ledger records cite, so it is computed from the canonical JSON of the
resolved spec: two files that resolve to the same rules share a hash, and any change to
what is enforced changes it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import yaml

from corral.policy.loader import ResolvedPolicy, load_policy, load_policy_data, preset_names
from corral.policy.schema import PolicySpec

if TYPE_CHECKING:
    from corral.model import Action, Decision
    from corral.policy.toolgate import ToolGate

__all__ = ["Policy", "preset_names"]

# Paths shown as "4GiB"/"30m" in ``to_yaml`` instead of raw bytes and seconds, so that
# ``corral policy show`` reads like what a person would write (and loads back the same).
_SIZE_PATHS = {
    ("resources", "memory"),
    ("resources", "disk"),
    ("resources", "tmp_size"),
    ("resources", "episode", "egress_bytes"),
    ("network", "max_bytes"),
}
_DURATION_PATHS = {
    ("resources", "wall_time"),
    ("resources", "episode", "wall_time"),
}


class _Gate(Protocol):
    def check(self, command: str) -> Decision: ...

    def check_action(
        self, action: Action, *, workspace: str | os.PathLike[str] | None = None
    ) -> Decision: ...

    def tool_gate(self, workspace: str | os.PathLike[str] | None = None) -> ToolGate: ...


class Policy:
    """A resolved policy. Build one with ``Policy.load`` or ``Policy.from_dict``."""

    name: str
    source: str
    spec: PolicySpec
    hash: str
    files: tuple[str, ...]

    def __init__(self, resolved: ResolvedPolicy) -> None:
        self.name = resolved.name
        self.source = resolved.source
        self.spec = resolved.spec
        self.files = resolved.files
        canonical = json.dumps(
            self.spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":")
        )
        self.hash = "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        self._gate: _Gate | None = None

    @classmethod
    def load(cls, name_or_path: str | os.PathLike[str]) -> Policy:
        """A shipped preset by name (``"swe"``) or a policy file by path."""
        return cls(load_policy(name_or_path))

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        source: str = "<dict>",
        base_dir: str | os.PathLike[str] | None = None,
    ) -> Policy:
        """A policy given as data (tests, programmatic use); ``extends`` works as in a file,
        with paths relative to ``base_dir`` (default: the current directory)."""
        return cls(load_policy_data(data, source=source, base_dir=base_dir))

    def derived(self, name: str, **sections: Mapping[str, Any]) -> Policy:
        """This policy, resolved, under a new name with keys of its sections replaced:
        ``swe.derived("swe-ci", network={"allow": []})``. Lists are replaced, not
        grown as ``extends`` would grow them: that is the point of deriving."""
        data = self.spec.model_dump(mode="json", exclude_none=True)
        data["name"] = name
        for section, changes in sections.items():
            data[section] = {**data.get(section, {}), **changes}
        return Policy.from_dict(data, source=f"<{name}, from {self.name}>")

    def to_dict(self) -> dict[str, Any]:
        """The resolved policy, JSON-able (sizes in bytes, durations in seconds)."""
        return self.spec.model_dump(mode="json")

    def to_yaml(self) -> str:
        """The resolved policy as YAML that loads back to the same policy (same hash)."""
        data = _humanize(self.to_dict(), ())
        data.pop("extends", None)  # already applied; always null once resolved
        header = f"# policy {self.name} ({self.source})\n# {self.hash}\n"
        return header + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)

    def check(self, command: str) -> Decision:
        """Decide a shell command with the gate (built on first use)."""
        return self._get_gate().check(command)

    def check_action(
        self, action: Action, *, workspace: str | os.PathLike[str] | None = None
    ) -> Decision:
        """Decide an ``Action`` (shell, exec or tool) with the gate; ``workspace`` is where
        a tool call's relative paths point (default: the current directory)."""
        gate = self._get_gate()
        if workspace is None:
            return gate.check_action(action)
        return gate.check_action(action, workspace=workspace)

    def tool_gate(self, workspace: str | os.PathLike[str] | None = None) -> ToolGate:
        """The tool gate for one workspace: what the lists say about a tool before it is
        called (``mcp-gateway`` lists only the tools it may call), and whole decisions."""
        return self._get_gate().tool_gate(workspace)

    def _get_gate(self) -> _Gate:
        if self._gate is None:
            # Imported lazily: the gate pulls in the shell parser and the threat rules,
            # which loading or showing a policy does not need.
            gate_module = importlib.import_module("corral.policy.gate")
            self._gate = gate_module.Gate(self)
        return self._gate

    def __repr__(self) -> str:
        return f"Policy(name={self.name!r}, source={self.source!r}, hash={self.hash[:19]}...)"


def _humanize(value: Any, path: tuple[str, ...]) -> Any:
    if isinstance(value, dict):
        return {k: _humanize(v, (*path, k)) for k, v in value.items()}
    if value is None or isinstance(value, bool):
        return value
    if path in _SIZE_PATHS and isinstance(value, int):
        return format_size(value)
    if path in _DURATION_PATHS and isinstance(value, int | float):
        return format_duration(float(value))
    return value


def format_size(n: int) -> str | int:
    """The largest binary unit that represents ``n`` exactly, else plain bytes."""
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n and n % factor == 0:
            return f"{n // factor}{unit}"
    return n


def format_duration(seconds: float) -> str | float:
    for unit, factor in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds and seconds % factor == 0:
            return f"{int(seconds // factor)}{unit}"
    return seconds
