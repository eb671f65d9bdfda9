"""The egress tests' real servers (sshd) and the watcher's fixtures serve the RL
environment's tests too."""

from tests.egress.conftest import sshd_server
from tests.watching import ledger, watcher

__all__ = ["ledger", "sshd_server", "watcher"]
