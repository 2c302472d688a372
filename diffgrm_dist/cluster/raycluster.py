"""Connecting to Ray: the local machine by default, a cluster when one is named.

``RAY_ADDRESS`` (set by ``ray job submit`` and by users of a running cluster) joins that
cluster; without it a local instance is started, bound to loopback, with no dashboard,
and torn down again by ``ray_session`` when the stage is done.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# Library loggers held at WARNING (ERROR where even their warnings repeat without news)
# unless DIFFGRM_VERBOSE=1 (`diffgrm --verbose`): their INFO lines are per step or per
# report, and a Ray Train cleaner actor warns every few seconds when the state API is off.
QUIET_LOGGERS = {
    "ray": logging.WARNING, "ray.train": logging.WARNING, "ray.data": logging.WARNING,
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
    "DeepSpeed": logging.ERROR, "deepspeed": logging.ERROR, "torch.distributed": logging.WARNING,
    "sentence_transformers": logging.WARNING, "transformers": logging.ERROR, "faiss": logging.WARNING,
    "wandb": logging.WARNING, "filelock": logging.WARNING, "urllib3": logging.WARNING,
}
SETUP_HOOK = "diffgrm_dist.cluster.raycluster.quiet_library_logs"
ACTOR_RESTARTS = 3  # embedding and ranking actors: restarts of a killed actor, retries of its task


def verbose() -> bool:
    return os.environ.get("DIFFGRM_VERBOSE") == "1"


def quiet_library_logs() -> None:
    """Holds library chatter back in this process (the driver, and every Ray worker through
    the runtime env's setup hook): no progress bars off a terminal, library loggers at
    WARNING. ``DIFFGRM_VERBOSE=1`` leaves everything as the libraries set it."""
    if verbose():
        return
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    # Ray Train's per-report INFO line comes from a logger named by its file's path.
    train_context = sys.modules.get("ray.train.v2._internal.execution.context")
    if train_context is not None and getattr(train_context, "__file__", None):
        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    os.environ.setdefault("WANDB_SILENT", "true")
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")  # tqdm >= 4.66 reads its defaults from TQDM_*
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def worker_runtime_env() -> dict:
    """What every worker of this job inherits: the setup hook and the verbosity switch."""
    keep = ("DIFFGRM_VERBOSE", "WANDB_SILENT", "TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")
    return {"worker_process_setup_hook": SETUP_HOOK,
            "env_vars": {k: os.environ[k] for k in keep if k in os.environ}}


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
        quiet_library_logs()
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True, runtime_env=worker_runtime_env())
        else:
            # Loopback only; Ray otherwise binds its services to the external interface.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                     _node_ip_address="127.0.0.1", log_to_driver=True, runtime_env=worker_runtime_env())
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


def check_resources(resources: ClusterResources, workers: int, cpus_each: int, gpus_each: int,
                    what: str) -> None:
    """One clear error, at once, for a request the cluster can never satisfy (Ray would
    otherwise wait on its placement group forever)."""
    from diffgrm_dist.core.errors import DiffGRMError

    missing = []
    if workers * gpus_each > resources.gpus:
        missing.append(f"{workers * gpus_each} GPU(s) for {workers} worker(s), the cluster has {resources.gpus}")
    if cpus_each > resources.max_node_cpus:
        missing.append(f"{cpus_each} CPU(s) on one node, the largest node has {resources.max_node_cpus}")
    if workers * cpus_each > resources.cpus:
        missing.append(f"{workers * cpus_each} CPU(s) for {workers} worker(s), the cluster has {resources.cpus}")
    if missing:
        raise DiffGRMError(f"{what}: the cluster ({resources.nodes} node(s)) can never run this: "
                           + "; ".join(missing) + ". Lower the request or add nodes.")


def replica_actor(cls: type, resources: ClusterResources, replicas: int, what: str) -> tuple[Any, dict, int]:
    """``cls`` as a Ray actor class for ``replicas`` copies: one GPU each where the cluster
    has GPUs, else an even share of its CPUs; a request it can never satisfy fails at once;
    a killed copy is restarted and its task retried. Returns the class, its resource
    options and the torch threads each copy should use (0: leave it to the GPU)."""
    import ray

    options = {"num_gpus": 1, "num_cpus": 1} if resources.gpus else {"num_cpus": cpus_per_worker(resources, replicas)}
    check_resources(resources, replicas, options["num_cpus"], options.get("num_gpus", 0), what)
    remote = ray.remote(**options, max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS)(cls)
    return remote, options, 0 if resources.gpus else options["num_cpus"]


def node_id() -> str:
    """The Ray node this process runs on (recorded in stats to show where work ran)."""
    import ray

    return ray.get_runtime_context().get_node_id()


def cpus_per_worker(resources: ClusterResources, workers: int) -> int:
    """An even share of the cluster's CPUs that still fits on one node."""
    return max(1, min(resources.cpus // max(workers, 1), resources.max_node_cpus or 1))


def free_port() -> int:
    """A TCP port free on the loopback interface now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
