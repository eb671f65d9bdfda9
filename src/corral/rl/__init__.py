"""Reinforcement learning on corral: shell commands in a sandbox as a gymnasium environment.

``ShellEnv`` is also registered with gymnasium as ``corral/Shell-v0``:
``gymnasium.make("corral/Shell-v0", task="...", workspace="repo/")``. Needs ``gymnasium``
(1.x), which corral itself does not depend on.
"""

from __future__ import annotations

try:
    import gymnasium
except ImportError as exc:  # corral's other parts work without it; say what is missing
    raise ImportError("corral.rl needs gymnasium: pip install 'gymnasium>=1.0'") from exc

from corral.rl.env import CHARSET, ENV_ID, EpisodeOver, RewardFn, ShellEnv

if ENV_ID not in gymnasium.registry:  # registering twice warns
    gymnasium.register(ENV_ID, entry_point="corral.rl.env:ShellEnv", nondeterministic=True)

__all__ = ["CHARSET", "ENV_ID", "EpisodeOver", "RewardFn", "ShellEnv"]
