"""The egress tests' real servers (sshd) serve the RL environment's tests too."""

from tests.egress.conftest import sshd_server

__all__ = ["sshd_server"]
