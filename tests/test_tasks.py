"""Where a run's tasks execute (pipelines.tasks, chosen by pipelines.config.runs_in_process): small jobs in the driver's process, the rest on Ray.

That both give the same rows, errors and features is checked end to end in
tests/test_pipeline.py (``test_features_do_not_depend_on_where_the_job_runs...``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lakes import config, lake
from fungi_ops.errors import ConfigError
from pipelines.config import runs_in_process
from pipelines.tasks import InProcessTasks

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("overrides, rows, expected", [
    ({}, 12, True),
    ({}, 0, True),  # nothing to featurize (a prune, a moved id): no Ray either
    ({"in_process_rows": 12}, 12, True),
    ({"in_process_rows": 12}, 13, False),
    ({"in_process_rows": 0}, 1, False),
    ({"address": "ray://head:10001"}, 1, False),
    ({"actors": (1, 1)}, 1, False),
    ({"gpus_per_actor": 0.5}, 1, False),
    ({"cpus_per_actor": 1.0}, 1, False),
])
def test_only_small_jobs_without_cluster_or_pool_settings_run_in_process(tmp_path, overrides, rows, expected, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert runs_in_process(rows, config("model", tmp_path, tmp_path / "out", **overrides)) is expected


def test_ray_address_in_the_environment_means_ray(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert not runs_in_process(1, config("model", tmp_path, tmp_path / "out"))


def test_a_negative_threshold_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="--in-process-rows"):
        config("model", tmp_path, tmp_path / "out", in_process_rows=-1).validate()


def test_in_process_tasks_call_at_once_and_give_values():
    tasks = InProcessTasks()
    started = tasks.remote(lambda a, b=0: (a, b), num_cpus=0.25, num_returns=2)(1, b=2)
    assert tasks.get(started) == (1, 2) and tasks.get([started]) == [(1, 2)] and tasks.put("x") == "x"


def test_a_small_job_in_a_fresh_process_starts_no_ray(tiny_text_dir, tmp_path):
    """The CLI's small job: features written and committed, Ray never initialized in that process, and
    the spec resolved there too (no child process loads the model a second time)."""
    source = lake(tmp_path / "in", files=2, rows=3)
    script = (
        "import json, subprocess, sys, ray\n"
        "children, popen = [], subprocess.Popen\n"
        "subprocess.Popen = lambda args, *a, **k: children.append(args[0]) or popen(args, *a, **k)\n"
        "from pipelines.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "print(json.dumps({'code': code, 'ray': ray.is_initialized(), 'children': children}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    child = subprocess.run(
        [sys.executable, "-c", script, "featurize", "--input", str(source), "--output", str(tmp_path / "out"),
         "--modality", "text", "--model", f"hf:{tiny_text_dir}"],
        capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300,
    )
    assert child.returncode == 0, child.stderr[-4000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert (result["code"], result["ray"], sys.executable in result["children"]) == (0, False, False), result
    manifest = json.loads((tmp_path / "out" / "_fungi_manifest.json").read_text())
    assert manifest["rows"] == 6 and manifest["pending"] is None


@pytest.mark.parametrize("chosen, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_torch_threads_wait_passively_in_the_cli_and_the_ray_workers_unless_the_user_chose(chosen, expected):
    """GNU OpenMP's spinning idle threads cost 2-5x the CPU per item where torch runs in a process's
    main thread (benchmarks/bench_omp_wait.py): importing pipelines sets OMP_WAIT_POLICY before
    torch loads, and Ray's workers get the driver's value through fungi's runtime env."""
    script = (
        "import os, ray\n"
        "from unittest import mock\n"
        "from pipelines import ray_runtime\n"
        "with mock.patch.object(ray, 'init') as init:\n"
        "    ray_runtime._init(None, 1)\n"
        "print(os.environ['OMP_WAIT_POLICY'], init.call_args.kwargs['runtime_env']['env_vars']['OMP_WAIT_POLICY'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR")}
    env["PYTHONPATH"] = str(REPO)
    if chosen:
        env["OMP_WAIT_POLICY"] = chosen
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert child.returncode == 0, child.stderr[-4000:]
    assert child.stdout.split() == [expected, expected]
