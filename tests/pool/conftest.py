"""A local Ray cluster of two logical nodes, made with Ray's own cluster utilities.

Ray binds to the machine's outward address unless told it is not a cluster machine;
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps every node on 127.0.0.1, so the tests'
traffic stays on loopback. It must be set before Ray is imported.
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from corral.ray import SandboxPool

NODE_CPUS = 32
NODE_MEMORY = 32 << 30


@pytest.fixture(scope="package")
def cluster() -> Iterator[Cluster]:
    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "object_store_memory": 80 << 20},
    )
    for _ in range(2):
        c.add_node(num_cpus=NODE_CPUS, memory=NODE_MEMORY, object_store_memory=80 << 20)
    ray.init(address=c.address, log_to_driver=False, include_dashboard=False)
    c.wait_for_nodes()
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture
def pool(cluster: Cluster, tmp_path: Path) -> Iterator[SandboxPool]:
    p = SandboxPool(name="t", state_dir=tmp_path / "state", run_id="run-pool")
    try:
        yield p
    finally:
        p.close()
