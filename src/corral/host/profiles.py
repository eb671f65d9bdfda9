"""Profiles: what a client's ``image`` names when corral serves ROCK's protocol.

corral has no container images. A sandbox is the host's read-only root under a policy,
so an image key picks a policy, the files a fresh workspace starts with, extra
environment and limits. Profiles are data (``profiles.yaml``, or a file of the same
shape given to ``corral serve --profiles``); an error names the file, line and key.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from corral.errors import CorralError, PolicyError, RuleError
from corral.policy import Policy
from corral.policy.loader import _line_for, keypath, parse_data_file, read_data_file
from corral.policy.schema import parse_size


class UnknownProfileError(CorralError, LookupError):
    """A client asked for an image no profile is registered under."""


class _ProfileFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str = ""
    policy: str
    workspace: str | None = None  # a directory copied into each new sandbox's workspace
    env: dict[str, str] = {}
    memory: str | int | None = None  # caps on what a client may ask for
    cpus: float | None = None


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int
    profiles: dict[str, _ProfileFile]


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    policy: Policy
    description: str = ""
    workspace: Path | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    memory: int | None = None  # bytes
    cpus: float | None = None


@dataclass(frozen=True, slots=True)
class ProfileRegistry:
    profiles: Mapping[str, Profile]
    source: str

    def get(self, name: str) -> Profile:
        try:
            return self.profiles[name]
        except KeyError:
            known = ", ".join(sorted(self.profiles))
            raise UnknownProfileError(
                f"no profile {name!r}: corral runs no container images, an image names a "
                f"profile (known: {known}; add one with corral serve --profiles FILE)"
            ) from None

    def names(self) -> list[str]:
        return sorted(self.profiles)

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> ProfileRegistry:
        """A profiles file; with no argument the shipped one."""
        if path is None:
            return _shipped()
        p = Path(path)
        text = read_data_file(p, "profiles")
        return _compile(text, str(p), p.parent)


@functools.cache
def _shipped() -> ProfileRegistry:
    res = resources.files("corral.host").joinpath("profiles.yaml")
    return _compile(res.read_text(encoding="utf-8"), str(res), None)


def _compile(text: str, display: str, base: Path | None) -> ProfileRegistry:
    doc, f = parse_data_file(text, display, _File)
    if f.version != 1:
        raise RuleError(f"unsupported version {f.version} (this corral reads 1)", file=display)
    out: dict[str, Profile] = {}
    for name, pf in f.profiles.items():
        where = ("profiles", name)

        def fail(key: str, message: str, where: tuple[str, ...] = where) -> RuleError:
            loc = (*where, key)
            return RuleError(message, file=display, line=_line_for(doc, loc, ""), key=keypath(loc))

        ref = pf.policy
        if base is not None and (ref.endswith((".yaml", ".yml")) or "/" in ref):
            ref = str((base / ref).resolve())
        try:
            policy = Policy.load(ref)
        except PolicyError as e:
            raise fail("policy", str(e)) from None
        workspace = None
        if pf.workspace is not None:
            workspace = Path(pf.workspace).expanduser()
            if base is not None and not workspace.is_absolute():
                workspace = base / workspace
            if not workspace.is_dir():
                raise fail("workspace", f"{workspace} is not a directory")
        try:
            memory = parse_size(pf.memory) if pf.memory is not None else None
        except ValueError as e:
            raise fail("memory", str(e)) from None
        out[name] = Profile(name, policy, pf.description, workspace, dict(pf.env), memory, pf.cpus)
    return ProfileRegistry(out, display)
