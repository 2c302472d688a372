"""Connecting to Ray: the local machine by default, a cluster when one is named.

``RAY_ADDRESS`` (set by ``ray job submit`` and by users of a running cluster) joins that
cluster; without it a local instance is started, bound to loopback, with no dashboard,
and torn down again by ``ray_session`` when the stage is done.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterResources:
    cpus: int
    gpus: int
    nodes: int
    max_node_cpus: int  # a task or actor cannot span nodes: the most CPUs one can ask for


@contextlib.contextmanager
def ray_session(num_cpus: int | None = None) -> Iterator[ClusterResources]:
    """Initialises Ray unless it already is; shuts down only what it started."""
    import ray

    started = False
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        else:
            # Loopback only; Ray otherwise binds its services to the external interface.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                     _node_ip_address="127.0.0.1", log_to_driver=True)
        started = True
    try:
        yield cluster_resources()
    finally:
        if started:
            ray.shutdown()


def cluster_resources() -> ClusterResources:
    import ray

    total = ray.cluster_resources()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    max_node_cpus = max((int(n.get("Resources", {}).get("CPU", 0)) for n in alive), default=0)
    return ClusterResources(cpus=int(total.get("CPU", 0)), gpus=int(total.get("GPU", 0)),
                            nodes=len(alive), max_node_cpus=max_node_cpus)


def node_id() -> str:
    """The Ray node this process runs on (recorded in stats to show where work ran)."""
    import ray

    return ray.get_runtime_context().get_node_id()


def cpus_per_worker(resources: ClusterResources, workers: int) -> int:
    """An even share of the cluster's CPUs that still fits on one node."""
    return max(1, min(resources.cpus // max(workers, 1), resources.max_node_cpus or 1))
