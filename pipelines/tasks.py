"""Where a run's tasks execute: on Ray, or, for a small job, in the driver's own process.

A run's O(rows) steps are plain functions (the stages of :mod:`pipelines.job`, the id check of
:mod:`pipelines.job.plan`, the setup draw of :mod:`pipelines.job.setup_rows`) that the job calls
through a :class:`Tasks`: :class:`RayTasks` makes each call a Ray task (the cluster, or
the local Ray), :class:`InProcessTasks` calls the function right away. The same functions
run either way, so a small job's features, files and manifest are those of a Ray run.
Which one a run takes is a setting (:func:`pipelines.config.runs_in_process`).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable

DEFAULT_IN_PROCESS_ROWS = 256  # bench_small_jobs.py: 32 and 128 images ran faster in one process than on Ray


class Tasks:
    """How a run's steps call their functions: :meth:`remote` starts one, :meth:`get` waits for results."""

    in_process = False

    def remote(self, fn: Callable[..., Any], **options: Any) -> Callable[..., Any]:
        """``fn`` as a task starter with Ray's ``options`` (``num_cpus``, ``num_returns``, ...)."""
        raise NotImplementedError

    def get(self, refs: Any) -> Any:
        """The result(s) of started tasks (a list of refs gives a list)."""
        raise NotImplementedError

    def put(self, value: Any) -> Any:
        """``value`` where every task reads it (Ray's object store; in process, the value itself)."""
        raise NotImplementedError

    def cpus(self) -> float:
        """The CPUs the tasks share."""
        raise NotImplementedError


class RayTasks(Tasks):
    """Each call a Ray task (Ray must be initialized), on a worker that can import torch
    (:func:`pipelines.ray_runtime.leave_if_torch_import_was_interrupted`)."""

    def remote(self, fn: Callable[..., Any], **options: Any) -> Callable[..., Any]:
        import ray

        from pipelines.ray_runtime import leave_if_torch_import_was_interrupted

        @functools.wraps(fn)
        def task(*args: Any, **kwargs: Any) -> Any:
            leave_if_torch_import_was_interrupted()
            return fn(*args, **kwargs)

        return (ray.remote(**options)(task) if options else ray.remote(task)).remote

    def get(self, refs: Any) -> Any:
        import ray

        return ray.get(refs)

    def put(self, value: Any) -> Any:
        import ray

        return ray.put(value)

    def cpus(self) -> float:
        from pipelines.ray_runtime import cluster_resources

        return cluster_resources()[0]


class InProcessTasks(Tasks):
    """Each call made at once in this process; results are the values themselves."""

    in_process = True

    def remote(self, fn: Callable[..., Any], **options: Any) -> Callable[..., Any]:
        return fn

    def get(self, refs: Any) -> Any:
        return refs

    def put(self, value: Any) -> Any:
        return value

    def cpus(self) -> float:
        return float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)

