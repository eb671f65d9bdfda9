"""The egress tests' real servers (sshd) serve the watcher's tests too."""

from tests.egress.conftest import sshd_server
from tests.watching import ledger, watcher

__all__ = ["ledger", "sshd_server", "watcher"]
