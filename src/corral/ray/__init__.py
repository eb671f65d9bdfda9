"""corral on Ray: ``SandboxPool`` puts one corral host on each node of a Ray cluster and
hands out sandboxes with the local ``Sandbox``'s interface; ``pool_app`` serves ROCK's
protocol for the whole pool (``corral serve --ray``). Needs ``pip install corral[ray]``."""

try:
    import ray as _ray  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        "corral.ray needs Ray, which is not installed: pip install 'corral[ray]'"
    ) from e

from corral.ray.live import PoolFleet, live_app, serving_live
from corral.ray.placement import Capacity, NoRoom, Request, choose
from corral.ray.pool import HostLost, PoolError, PoolFull, PoolSandbox, SandboxPool
from corral.ray.service import HostService
from corral.ray.serving import PoolSandboxes, pool_app, serving_pool

__all__ = [
    "Capacity",
    "HostLost",
    "HostService",
    "NoRoom",
    "PoolError",
    "PoolFleet",
    "PoolFull",
    "PoolSandbox",
    "PoolSandboxes",
    "Request",
    "SandboxPool",
    "choose",
    "live_app",
    "pool_app",
    "serving_live",
    "serving_pool",
]
