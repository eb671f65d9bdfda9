"""What the watcher's tests and the RL environment's tests share: a policy whose gate lets
everything through (so what stops an attack is the watcher), a ledger and a watcher."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from corral.ledger import Ledger
from corral.policy import Policy
from corral.watch.gpu import FakeGpuBackend
from corral.watch.watcher import Watcher


def policy(*allow: str, **extra: Any) -> Policy:
    """Everything allowed by the gate, the proxy open to ``allow``."""
    return Policy.from_dict(
        {
            "version": 1,
            "extends": "strict",
            "commands": {"default": "allow", "threats": False},
            "network": {"mode": "proxy", "allow": list(allow)},
            **extra,
        }
    )


@pytest.fixture
def ledger() -> Iterator[Ledger]:
    with Ledger.memory() as led:
        yield led


@pytest.fixture(scope="module")
def watcher() -> Iterator[Watcher]:
    w = Watcher(gpu=FakeGpuBackend())
    yield w
    w.close()
