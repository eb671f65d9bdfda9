"""``corral demo``: the ROME incident replayed through corral's gate.

The trajectory is data (``trajectory.yaml``): a coding task done properly, then the
actions ROME took on its own. Each step is decided by the policy, recorded in the ledger
with its run, episode and step, and the ledger is verified at the end.
"""

from corral.demo.replay import run_demo

__all__ = ["run_demo"]
