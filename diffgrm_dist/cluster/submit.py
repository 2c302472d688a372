"""Submitting ``diffgrm`` stages to a running Ray cluster through the Ray Jobs API.

``ray job submit`` would do, but the CLI wants the same defaults every time: the project
folder as the job's working directory without the virtualenv, run folders and other
bulky or private paths, and environment variables passed through without their secret
values ever being echoed to a terminal or a log.

``address`` is the cluster's dashboard / Jobs API URL (``http://HEAD:8265``; ``ray
dashboard cluster/aws.yaml`` forwards it to localhost for clusters started with ``ray
up``). Token authentication is Ray's: with ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN``
or ``RAY_AUTH_TOKEN_PATH`` set, the client sends the token with every request.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from diffgrm_dist.core.rundir import is_uri

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

# Never uploaded: the local virtualenv (hundreds of MB, wrong platform for the cluster),
# run outputs, git history, wandb's local cache and benchmark results.
WORKING_DIR_EXCLUDES: tuple[str, ...] = (".venv", "runs", ".git", "wandb", "tools/results")

# Environment variable names whose values are never printed.
_SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.IGNORECASE)
REDACTED = "***"

TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
_SETTLE_POLLS = 30


def is_secret(name: str) -> bool:
    """Whether an environment variable's name marks its value as a secret."""
    return bool(_SECRET_NAME.search(name))


def redact(env: Mapping[str, str] | None) -> dict[str, str]:
    """A copy of ``env`` that is safe to print: secret-looking values become ``***``."""
    return {name: (REDACTED if is_secret(name) else value) for name, value in (env or {}).items()}


def entrypoint_for(stage: str, config: str, run_dir: str, overrides: Sequence[str] = ()) -> str:
    """The shell command a job runs: ``diffgrm STAGE -c CONFIG -o RUN_DIR [overrides]``.

    The Jobs API runs the entrypoint through a shell, so every argument is quoted:
    overrides such as ``data.text_template=["Title: {title}"]`` must arrive intact.
    ``run_dir`` must be a URI (``s3://``, ``gs://``: see :mod:`diffgrm_dist.core.rundir`) or an
    absolute path on storage every node mounts: the job runs in a temporary copy of the
    working directory, so a relative run folder would be deleted with it (``config`` may be
    relative: it is read from that copy).
    """
    if not stage or stage.startswith("-"):
        raise ValueError(f"not a stage name: {stage!r}")
    if not (run_dir.startswith("/") or is_uri(run_dir)):
        raise ValueError(f"run_dir {run_dir!r}: give a URI on storage every node reaches "
                         "(s3://bucket/runs/NAME, gs://...) or an absolute path on a shared file "
                         "system (/mnt/diffgrm/runs/NAME); relative paths land in the job's "
                         "temporary working directory")
    args = ["diffgrm", stage, "-c", config, "-o", run_dir, *overrides]
    return shlex.join(args)


def runtime_env(working_dir: str, env: Mapping[str, str] | None = None) -> dict[str, object]:
    """The job's runtime_env: the uploaded project folder and the extra environment."""
    spec: dict[str, object] = {"working_dir": working_dir, "excludes": list(WORKING_DIR_EXCLUDES)}
    if env:
        spec["env_vars"] = dict(env)
    return spec


def _client(address: str) -> JobSubmissionClient:
    # Imported here so that `import diffgrm_dist.cluster.submit` (and the CLI's --help) stays fast.
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def submit(address: str, entrypoint: str, working_dir: str, env: dict[str, str] | None = None) -> str:
    """Uploads ``working_dir`` and starts ``entrypoint`` on the cluster; returns the job id.

    ``env`` is set in the job's processes (the driver and every task and actor it starts),
    which is how credentials such as WANDB_API_KEY reach a cluster without being written
    into a config file.
    """
    for name, value in (env or {}).items():
        if not isinstance(name, str) or not isinstance(value, str):
            # The value's type only: the value itself may be a secret.
            raise TypeError(f"env[{name!r}]: names and values must be str, not {type(value).__name__}")
    return _client(address).submit_job(entrypoint=entrypoint, runtime_env=runtime_env(working_dir, env))


def status(address: str, job_id: str) -> str:
    """The job's status: PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED."""
    return str(_client(address).get_job_status(job_id).value)


def stop(address: str, job_id: str) -> bool:
    """Asks the cluster to stop the job; True if it was still running."""
    return bool(_client(address).stop_job(job_id))


async def _tail(client: JobSubmissionClient, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        print(chunk, end="", flush=True)


def follow(address: str, job_id: str) -> str:
    """Prints the job's output as it is produced until the job ends; returns its status.

    The log stream closes when the job reaches a terminal state; the status is then read
    once more, since the stream does not carry it.
    """
    client = _client(address)
    asyncio.run(_tail(client, job_id))
    state = str(client.get_job_status(job_id).value)
    for _ in range(_SETTLE_POLLS):  # the stream can close a moment before the status flips
        if state in TERMINAL_STATUSES:
            break
        time.sleep(1.0)
        state = str(client.get_job_status(job_id).value)
    return state
