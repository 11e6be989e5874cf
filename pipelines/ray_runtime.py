"""Start or join Ray: a local instance sized to the machine by default, a cluster when asked;
and leave a Ray worker process that a cancelled task left unable to import torch.

Usage-stats reporting is always off: it would try to reach the internet.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``) if given, else start a local Ray.

    ``ray.init`` replaces the driver's SIGTERM handler with ``sys.exit(15)``; a handler set before
    (the CLI's, :mod:`pipelines.interrupts`) is put back, so SIGTERM still ends a run with one line.
    """
    import ray

    if ray.is_initialized():
        return
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        _init(address, num_cpus)
    finally:
        if callable(sigterm) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, sigterm)  # ray.init replaced it with sys.exit(15): keep the CLI's


def _init(address: str | None, num_cpus: int | None) -> None:
    """``ray.init`` with fungi's runtime env and log levels."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    # OMP_WAIT_POLICY: the driver's (pipelines/__init__.py sets PASSIVE unless the user chose), so
    # that the actors' torch does not spin-wait either, on a cluster's workers too
    env_vars = {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false",
                "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    # Inside a submitted Ray job, Ray merges this with the job's runtime env and refuses a
    # variable that both set: leave those to the job's runtime env.
    runtime_env = {"env_vars": {k: v for k, v in env_vars.items() if k not in _job_env_vars()}}
    if address:
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
    else:
        # a local Ray turns token authentication on by itself and says so on stderr: the
        # secure default, and noise beside a one-line error or summary, so not repeated here
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            runtime_env=runtime_env,
            logging_level=logging.WARNING,
        )


def _job_env_vars() -> set[str]:
    """Names of the env vars set by the runtime env of the Ray job this driver runs in, if any."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray's job supervisor
    if not raw:
        return set()
    try:
        return set((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        return set()


def cluster_resources() -> tuple[float, float]:
    """(CPUs, GPUs) Ray can schedule on right now."""
    import ray

    resources = ray.cluster_resources()
    return float(resources.get("CPU", 0)), float(resources.get("GPU", 0))


# EX_TEMPFAIL: the worker leaves so that Ray retries its task on a fresh one
INTERRUPTED_TORCH_IMPORT_EXIT = 75


def leave_if_torch_import_was_interrupted() -> None:
    """Exit this Ray worker process if an earlier task's import of torch was cut short; in a
    driver, raise :class:`~fungi_ops.errors.FungiError` saying to restart the process.

    Why: Ray reuses a worker process after cancelling its task, and Ray Data cancels its
    running tasks when a run is stopped (Ctrl-C, SIGTERM, an error elsewhere). A cancel that
    lands while the task imports torch leaves torch's submodules in ``sys.modules`` without
    torch itself; every later import of torch in that process then fails, or yields a module
    that lacks attributes (``module 'torch' has no attribute '_utils'`` when a pickled tensor
    is loaded). The next run on the same Ray (a notebook, a test session, a long-lived
    cluster's job) would fail for no reason of its own. Python cannot re-import torch's C
    extension, so the process cannot be repaired: a worker exits, and Ray retries the task
    (or restarts the actor) on a fresh worker. Called first by every fungi task and actor
    that may import torch (:class:`pipelines.tasks.RayTasks`, :mod:`pipelines.job`).
    """
    torch = sys.modules.get("torch")
    if (torch is not None and hasattr(torch, "_utils")) or not any(name.startswith("torch.") for name in sys.modules):
        return  # torch imported whole, or not at all
    message = ("torch's import in this process was interrupted earlier (a cancelled task or a Ctrl-C "
               "during the import); it cannot be imported again in this process")
    if _on_ray_worker():
        print(f"fungi: {message}: this Ray worker exits, and Ray retries its task on a fresh one",
              file=sys.stderr, flush=True)
        os._exit(INTERRUPTED_TORCH_IMPORT_EXIT)
    from fungi_ops.errors import FungiError

    raise FungiError(f"{message}: restart this Python process (in a notebook, restart the kernel)")


def _on_ray_worker() -> bool:
    """Whether this process is a Ray worker (a task's or an actor's), not a driver."""
    if "ray" not in sys.modules:
        return False
    import ray

    return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
