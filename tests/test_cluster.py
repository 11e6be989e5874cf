"""Cluster configs, and `fungi featurize` as a Ray job on a real multi-process Ray cluster.

The config tests parse cluster/*.yaml (the launcher YAML against Ray's own schema) and check
that every entrypoint is a valid `fungi` command line.

The cluster tests start real Ray processes (`ray start --block`), on 127.0.0.1 only:
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes Ray advertise the loopback address instead of
the machine's, every port is picked free, and each node has its own temp dir (never
/tmp/ray: no other Ray on the machine can find or join this cluster) and HOME (no
~/.ray/auth_token is read or written). Each node runs in its own process group: killing the
group is how a node is lost, and how the fixtures make sure nothing outlives the tests
(never `ray stop`, which would stop every Ray on the machine).

The head runs with token authentication (``RAY_AUTH_MODE=token``, a generated token) and
the job server; jobs go through `fungi submit` with the repository as ``working_dir``. In
the node-loss test two worker nodes declare one logical GPU each, so that the actor pool
(``--gpus-per-actor 1``) lands on them and not on the head, as on a real GPU cluster; the
actors then run on CPU (there is no CUDA here).
"""
from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines import cli

REPO = Path(__file__).resolve().parents[1]
CLUSTER_DIR = REPO / "cluster"
BIN = Path(sys.executable).parent
ROWS = 48
JOB_TIMEOUT = 400  # s: the most one job may take before `fungi submit --timeout` stops it
START_TIMEOUT = 180  # s: for a node to register


# -- the configs -------------------------------------------------------------------------
def load_yaml(name: str):
    return yaml.safe_load((CLUSTER_DIR / name).read_text())


def parse_fungi(entrypoint: str):
    words = shlex.split(entrypoint)
    assert words[0] == "fungi", entrypoint
    return cli.build_parser().parse_args(words[1:])


def test_runtime_env_is_valid_and_keeps_secrets_and_usage_stats_out():
    from ray.runtime_env import RuntimeEnv

    runtime_env = load_yaml("runtime_env.yaml")
    RuntimeEnv(**runtime_env)  # raises on unknown or malformed fields
    env_vars = runtime_env["env_vars"]
    assert env_vars["RAY_USAGE_STATS_ENABLED"] == "0"
    assert not {"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(env_vars)
    assert ".git" in runtime_env["excludes"] and ".venv" in runtime_env["excludes"]


def test_rayjob_runs_fungi_featurize_and_shuts_the_cluster_down():
    job = load_yaml("rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    args = parse_fungi(spec["entrypoint"])
    assert args.command == "featurize" and args.incremental
    assert args.gpus_per_actor == 1 and args.actors[0] < args.actors[1]  # autoscaling GPU pool
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == load_yaml("runtime_env.yaml")
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token" and cluster["enableInTreeAutoscaling"] is True
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())  # map[string]string
        (container,) = group["template"]["spec"]["containers"]
        assert {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"} in container["env"]
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert workers["minReplicas"] < workers["maxReplicas"]


def test_rayservice_serves_fungi_with_the_token_from_a_secret_and_autoscaling_gpu_replicas():
    import importlib

    service = load_yaml("rayservice.yaml")
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    (app,) = config["applications"]
    module, _, name = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), name))
    args = cli.build_parser().parse_args(["serve", *app["args"]["argv"]])  # the command's own options
    assert args.command == "serve" and args.token_file == "/etc/fungi/token"
    assert args.replicas == "1,8" and 0 < args.gpus_per_replica < 1 and args.poll_s > 0
    assert app["runtime_env"]["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["authOptions"]["mode"] == "token" and cluster["enableInTreeAutoscaling"] is True
    (workers,) = cluster["workerGroupSpecs"]
    for pod in (cluster["headGroupSpec"]["template"]["spec"], workers["template"]["spec"]):
        (container,) = pod["containers"]
        assert {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"} in container["env"]
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/etc/fungi")
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert volume["secret"]["secretName"] == "fungi-serve-token" and volume["secret"]["items"][0]["path"] == "token"
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert workers["minReplicas"] < workers["maxReplicas"]


def test_nightly_cronjob_creates_the_incremental_rayjob():
    docs = {d["kind"]: d for d in yaml.safe_load_all((CLUSTER_DIR / "nightly-cronjob.yaml").read_text())}
    cron = docs["CronJob"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    script = pod["containers"][0]["args"][0]
    assert "kubectl create -f /manifests/rayjob.yaml" in script
    assert pod["volumes"][0]["configMap"]["name"] == "fungi-nightly-rayjob"
    rules = docs["Role"]["rules"][0]
    assert rules["apiGroups"] == ["ray.io"] and "create" in rules["verbs"]
    assert load_yaml("rayjob.yaml")["metadata"]["generateName"]  # a new RayJob each night


def test_cluster_launcher_config_is_valid_for_ray():
    import copy

    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_yaml("cluster-launcher.yaml")
    validate_config(prepare_config(copy.deepcopy(config)))
    typo = dict(copy.deepcopy(config), setup_comands=[])
    with pytest.raises(Exception):
        validate_config(prepare_config(typo))
    nodes = config["available_node_types"]
    assert config["head_node_type"] in nodes
    assert any(n.get("max_workers", 0) > n.get("min_workers", 0) for n in nodes.values())  # autoscaling
    setup = " ".join(config["setup_commands"])
    assert "ray[data,default,serve]" in setup and "~/fungi" in setup
    for command in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token" in command and "--disable-usage-stats" in command
    assert "--dashboard-host=127.0.0.1" in config["head_start_ray_commands"][1]
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def readme_commands() -> list[list[str]]:
    """The shell commands of cluster/README.md's code blocks, continuation lines joined."""
    commands, block, pending = [], None, ""
    for line in (CLUSTER_DIR / "README.md").read_text().splitlines():
        if line.lstrip().startswith("```"):
            block = line.strip()[3:] if block is None else None
            continue
        if block != "bash":
            continue
        pending += line.strip().removesuffix("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            for part in pending.replace("&&", ";").split(";"):
                words = shlex.split(part, comments=True)
                while words and "=" in words[0] and not words[0].startswith("-"):
                    words = words[1:]  # NAME=value prefixes
                for index, word in enumerate(words):
                    if word.startswith((">", "2>", "|")):
                        words = words[:index]  # redirections
                        break
                if words:
                    commands.append(words)
            pending = ""
    return commands


def test_readme_fungi_commands_parse():
    """Every `fungi ...` (and `ray job submit -- fungi ...`) in cluster/README.md is valid."""
    from pipelines.submit import build_entrypoint

    checked = 0
    for words in readme_commands():
        if words[:3] == ["ray", "job", "submit"]:
            words = words[words.index("--") + 1 :]
        if words[0] != "fungi":
            continue
        args = cli.build_parser().parse_args(words[1:])
        if args.command == "submit":
            build_entrypoint(list(args.fungi_command))  # the command run on the cluster
        checked += 1
    assert checked >= 4


# -- a local multi-process Ray cluster ---------------------------------------------------
def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def base_env(home: Path) -> dict[str, str]:
    """The environment of this cluster's processes: loopback only, offline, no usage stats."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "FUNGI_"))}
    env.update(
        HOME=str(home),
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        # this checkout, whatever the venv's (editable) install points at; jobs add their working_dir
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # advertise 127.0.0.1, not the machine's address
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    home.mkdir(parents=True, exist_ok=True)
    return env


# A worker node on 127.0.0.1. `ray start --address=127.0.0.1:...` would swap the loopback
# address for the machine's (Ray does so unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and then
# `ray start` refuses to join a second node), so worker nodes are started the way
# ray.cluster_utils.Cluster starts them (a ray._private.node.Node), in a process of their own.
WORKER_NODE_MAIN = """
import json, signal, sys, time
from ray._private.node import Node
from ray._private.parameter import RayParams

node = Node(RayParams(**json.loads(sys.argv[1])), head=False, shutdown_at_exit=True, spawn_reaper=True)
print("worker node started", node.node_id, flush=True)

def stop(*_):
    node.kill_all_processes(check_alive=False, allow_graceful=True)
    sys.exit(0)

signal.signal(signal.SIGTERM, stop)
while True:
    time.sleep(1)
"""


RAY_START_TIMED_OUT = "The current node timed out during startup"  # ray._private.node's message


class NodeStartTimedOut(RuntimeError):
    """A Ray node gave up before its raylet registered: the machine was busy, not broken."""


class RayNode:
    """One Ray node (`ray start --block`, or WORKER_NODE_MAIN) in its own session.

    Every process of the node keeps that session id (workers get process groups of their
    own, not sessions), which is how its processes are found and killed.
    """

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv,
                env=env, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def processes(self) -> list:
        import psutil

        found = []
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) == self.proc.pid and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except (ProcessLookupError, PermissionError, psutil.Error):
                pass
        return found

    def hosts(self, fragment: str) -> bool:
        """Whether a process of this node runs something whose title contains ``fragment``."""
        import psutil

        for proc in self.processes():
            try:
                if fragment in " ".join(proc.cmdline()):
                    return True
            except psutil.Error:
                pass
        return False

    def signal_all(self, signum: int) -> None:
        for proc in [*self.processes(), self.proc]:
            try:
                os.kill(proc.pid, signum)
            except (ProcessLookupError, PermissionError):
                pass

    def kill(self, timeout: float = 30.0) -> None:
        """Lose the node: SIGKILL every process of it, until none is left.

        Once is not enough: a process killed while it tears down a large address space
        stays listed (running) for a moment, and the raylet may have forked a worker
        between the listing and its own death.
        """
        deadline = time.monotonic() + timeout
        self.signal_all(signal.SIGKILL)
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.1)
            self.signal_all(signal.SIGKILL)
        try:
            self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass

    def stop(self) -> None:
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.processes():
            time.sleep(0.2)
        self.kill()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class LocalCluster:
    """A head (GCS, job server, token auth) and worker nodes, all on 127.0.0.1."""

    def __init__(self) -> None:
        # short: Ray's unix socket paths live under the temp dir (108-byte limit)
        self.root = Path(tempfile.mkdtemp(prefix="fgr", dir="/tmp"))
        self.token = secrets.token_hex(24)
        self.env = base_env(self.root / "home")
        self.env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            # notice a lost node within seconds, not the default ~30 s
            RAY_health_check_initial_delay_ms="0",
            RAY_health_check_period_ms="1000",
            RAY_health_check_timeout_ms="2000",
            RAY_health_check_failure_threshold="4",
            RAY_agent_register_timeout_ms="300000",  # agents start slowly on a busy machine
            # no idle workers started ahead: they would lack the job's runtime env anyway
            RAY_enable_worker_prestart="0",
            RAY_prestart_worker_first_driver="0",
        )
        self.nodes: dict[str, RayNode] = {}

    def start_head(self, num_cpus: float) -> None:
        gcs, dashboard, client, agent, agent_grpc, runtime_env, metrics = free_ports(7)
        self.gcs_address = f"127.0.0.1:{gcs}"
        self.url = f"http://127.0.0.1:{dashboard}"
        argv = [
            str(BIN / "ray"), "start", "--block", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
            f"--metrics-export-port={metrics}", "--min-worker-port=0", "--max-worker-port=0",
            f"--temp-dir={self.root / 'head'}", f"--num-cpus={num_cpus:g}", "--num-gpus=0",
            "--object-store-memory=150000000", "--disable-usage-stats",
        ]
        self.nodes["head"] = RayNode("head", argv, self.env, self.root)
        self.wait_for_nodes(1)

    def add_worker(self, name: str, num_cpus: float, num_gpus: int = 0, attempts: int = 3) -> RayNode:
        """Start a worker node and wait until it is alive.

        Ray gives a new node a fixed 30 s to register with the GCS (``ray._private.node``),
        which a busy 2-core machine can exceed (the suite runs on two workers): a node whose
        start-up timed out is killed and started again, on fresh ports.
        """
        for _ in range(attempts - 1):
            node = self.spawn_worker(name, num_cpus, num_gpus)
            try:
                self.wait_for_nodes(len(self.nodes))
                return node
            except NodeStartTimedOut:
                self.nodes.pop(name).kill()
        node = self.spawn_worker(name, num_cpus, num_gpus)
        self.wait_for_nodes(len(self.nodes))
        return node

    def spawn_worker(self, name: str, num_cpus: float, num_gpus: int) -> RayNode:
        # fixed agent ports: the raylet then does not wait on the agents to publish theirs
        agent, agent_grpc, runtime_env, metrics = free_ports(4)
        params = dict(
            gcs_address=self.gcs_address, node_ip_address="127.0.0.1", num_cpus=num_cpus, num_gpus=num_gpus,
            object_store_memory=150_000_000, min_worker_port=0, max_worker_port=0, node_manager_port=0,
            dashboard_agent_listen_port=agent, metrics_agent_port=agent_grpc, runtime_env_agent_port=runtime_env,
            metrics_export_port=metrics,
            temp_dir=str(self.root / name),
        )
        argv = [sys.executable, "-c", WORKER_NODE_MAIN, json.dumps(params)]
        node = RayNode(name, argv, self.env, self.root)
        self.nodes[name] = node
        return node

    def request(self, method: str, path: str, token: str | None = "default", **kwargs):
        import requests

        headers = dict(kwargs.pop("headers", {}))
        token = self.token if token == "default" else token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return requests.request(method, self.url + path, headers=headers, timeout=30, **kwargs)

    def alive_nodes(self) -> int:
        try:
            response = self.request("GET", "/nodes?view=summary")
            summary = response.json()["data"]["summary"]
        except Exception:  # noqa: BLE001 - not up yet
            return 0
        return sum(1 for node in summary if node.get("raylet", {}).get("state") == "ALIVE")

    def wait_for_nodes(self, count: int, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while self.alive_nodes() < count:
            for node in self.nodes.values():
                if node.proc.poll() is not None:
                    log = node.log_tail()
                    failure = NodeStartTimedOut if RAY_START_TIMED_OUT in log else RuntimeError
                    raise failure(f"ray node {node.name} exited:\n{log}")
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n.name}\n{n.log_tail()}" for n in self.nodes.values())
                raise TimeoutError(f"{count} Ray nodes not alive after {timeout} s:\n{logs}")
            time.sleep(1)

    def stop_job(self, submission_id: str) -> None:
        try:
            self.request("POST", f"/api/jobs/{submission_id}/stop")
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass

    def stop(self) -> None:
        for name in list(self.nodes)[::-1]:
            self.nodes.pop(name).stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    cluster = LocalCluster()

    def on_sigterm(signum, frame):  # e.g. a CI timeout: do not leave the cluster running
        cluster.stop()
        signal.signal(signal.SIGTERM, previous)
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        cluster.start_head(num_cpus=3)
        yield cluster
    finally:
        signal.signal(signal.SIGTERM, previous)
        cluster.stop()


@pytest.fixture(scope="module")
def text_input(tmp_path_factory) -> Path:
    """ROWS text rows in two Parquet files."""
    directory = tmp_path_factory.mktemp("cluster_input")
    ids = [f"row-{i:03d}" for i in range(ROWS)]
    texts = [f"sentence {i}: the {'cat' if i % 2 else 'dog'} sat on mat number {i * 7 % 13}" for i in range(ROWS)]
    half = ROWS // 2
    pq.write_table(pa.table({"id": ids[:half], "text": texts[:half]}), directory / "part-0.parquet")
    pq.write_table(pa.table({"id": ids[half:], "text": texts[half:]}), directory / "part-1.parquet")
    return directory


def featurize_args(text_input: Path, output: Path, minilm_dir: str, *extra: str) -> list[str]:
    return [
        "featurize", "--input", str(text_input), "--output", str(output), "--modality", "text",
        "--model", f"hf:{minilm_dir}", "--objectives", "kl", "--batch-size", "2", "--actors", "1",
        "--cpus-per-actor", "1", *extra,
    ]


def submit_command(cluster: LocalCluster, command: list[str], submission_id: str, *options: str) -> list[str]:
    return [
        str(BIN / "fungi"), "submit", "--address", cluster.url, "--working-dir", str(REPO),
        "--submission-id", submission_id, "--timeout", str(JOB_TIMEOUT), *options, "--", *command,
    ]


def client_env(cluster: LocalCluster, authenticated: bool = True) -> dict[str, str]:
    env = base_env(cluster.root / "client-home")  # no ~/.ray/auth_token there
    if authenticated:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=cluster.token)
    return env


def fungi_submit(cluster: LocalCluster, command: list[str], *options: str, authenticated: bool = True):
    """Run `fungi submit` to the end; (exit code, stdout + stderr, seconds)."""
    submission_id = f"fungi-test-{uuid.uuid4().hex[:10]}"
    started = time.monotonic()
    try:
        proc = subprocess.run(
            submit_command(cluster, command, submission_id, *options), env=client_env(cluster, authenticated),
            cwd=str(cluster.root), capture_output=True, text=True, timeout=JOB_TIMEOUT + 60,
        )
    except subprocess.TimeoutExpired:
        cluster.stop_job(submission_id)
        raise
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started


def read_features(output: Path) -> pa.Table:
    table = pq.ParquetDataset(sorted(str(p) for p in output.glob("part-*.parquet"))).read()
    return table.sort_by("id")


def manifest(output: Path) -> dict:
    return json.loads((output / "_fungi_manifest.json").read_text())


def assert_complete(output: Path, reference: pa.Table | None = None) -> pa.Table:
    """Every input row exactly once, no errors; features equal to ``reference`` if given."""
    table = read_features(output)
    ids = table.column("id").to_pylist()
    assert ids == [f"row-{i:03d}" for i in range(ROWS)]  # sorted: none missing, none twice
    assert manifest(output)["rows"] == ROWS and manifest(output)["errors"] == 0
    run = manifest(output)["runs"][-1]
    assert (run["rows_written"], run["rows_failed"]) == (ROWS, 0)
    if reference is not None:
        assert table.column("content_hash").equals(reference.column("content_hash"))
        for name in ("embedding", "grad_kl"):
            got = np.stack(table.column(name).to_numpy(zero_copy_only=False))
            want = np.stack(reference.column(name).to_numpy(zero_copy_only=False))
            np.testing.assert_array_equal(got, want)
    return table


@pytest.fixture(scope="module")
def reference(cluster, text_input, minilm_dir, tmp_path_factory):
    """An undisturbed featurize job, submitted with the token: the features every other run must match."""
    output = tmp_path_factory.mktemp("cluster_out") / "reference"
    code, out, seconds = fungi_submit(cluster, featurize_args(text_input, output, minilm_dir))
    assert code == 0, out
    return output, out, seconds


@pytest.mark.slow
def test_submitted_job_succeeds_with_token_auth(cluster, reference):
    output, out, seconds = reference
    assert "fungi: submitted job fungi-test-" in out and "SUCCEEDED" in out
    assert "written 48, failed 0" in out  # the driver's own summary line, streamed back
    assert cluster.token not in out
    table = assert_complete(output)
    assert {"embedding", "grad_kl", "content_hash"} <= set(table.column_names)
    assert manifest(output)["runs"][0]["mode"] == "full"


@pytest.mark.slow
def test_unauthenticated_submission_is_refused(cluster, text_input, minilm_dir, tmp_path):
    job = {"entrypoint": "echo should-never-run"}
    assert cluster.request("POST", "/api/jobs/", token=None, json=job).status_code == 401
    assert cluster.request("POST", "/api/jobs/", token="not-the-token", json=job).status_code == 403
    before = {job["submission_id"] for job in cluster.request("GET", "/api/jobs/").json()}
    code, out, _ = fungi_submit(cluster, featurize_args(text_input, tmp_path / "out", minilm_dir), authenticated=False)
    assert code == 2, out
    assert "401" in out and "RAY_AUTH_MODE=token" in out
    assert {job["submission_id"] for job in cluster.request("GET", "/api/jobs/").json()} == before  # nothing submitted
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_missing_input_fails_fast_with_the_message(cluster, minilm_dir, tmp_path):
    missing = tmp_path / "no-such-input"
    code, out, seconds = fungi_submit(cluster, featurize_args(missing, tmp_path / "out", minilm_dir))
    assert code == 2, out  # the driver's exit code: a configuration error
    assert f"error: input {missing} does not exist" in out
    assert "FAILED" in out
    assert "Starting execution of Dataset" not in out and seconds < 150  # failed before any data was read


@pytest.mark.slow
def test_wrong_model_fails_fast_with_the_message(cluster, text_input, tmp_path):
    command = featurize_args(text_input, tmp_path / "out", "fungi-tests/no-such-model")
    code, out, seconds = fungi_submit(cluster, command)
    assert code == 2, out
    assert "cannot load Hugging Face config for 'fungi-tests/no-such-model'" in out
    assert "Starting execution of Dataset" not in out and seconds < 150
    assert not list((tmp_path / "out").glob("part-*.parquet"))


@pytest.mark.slow
def test_actor_crash_and_node_loss_mid_dataset(cluster, reference, text_input, minilm_dir, tmp_path):
    """One job, two faults: the featurize actor crashes on its first batch (injected), then the
    worker node that hosts it is killed while blocks are still to do. Ray restarts the actor
    (max_restarts) and retries its tasks (max_task_retries) and the lost objects (lineage):
    every row comes out exactly once, with the features of the undisturbed run."""
    # "GPU" workers: the actor (1 CPU, 1 GPU) fits on either, never on the head; nothing
    # else fits beside it, so the decode/write tasks stay on the head
    gpu_nodes = []
    for index in range(2):
        gpu_nodes.append(cluster.add_worker(f"gpu{index}", num_cpus=1, num_gpus=1))
    try:
        output, marker = tmp_path / "out", tmp_path / "crashed-once"
        command = featurize_args(text_input, output, minilm_dir, "--gpus-per-actor", "1")
        submission_id = f"fungi-test-{uuid.uuid4().hex[:10]}"
        log_path = tmp_path / "submit.log"
        options = ("--env", f"FUNGI_FAULT_INJECT_ONCE={marker}")
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                submit_command(cluster, command, submission_id, *options), env=client_env(cluster),
                cwd=str(cluster.root), stdout=log, stderr=subprocess.STDOUT,
            )
        try:
            victim, staged = None, 0
            deadline = time.monotonic() + JOB_TIMEOUT
            # after the crash, the node that hosts the restarted actor (finding it takes a
            # process scan: done before the window below, which can be short)
            while victim is None and proc.poll() is None and time.monotonic() < deadline:
                if marker.exists():
                    victim = next((n for n in gpu_nodes if n.hosts("FeaturizeActor")), None)
                time.sleep(0.1)
            # then, once that actor has written a block
            while not staged and proc.poll() is None and time.monotonic() < deadline:
                staged = len(list(output.glob("_staging/*/blocks/*.pqt")))
                time.sleep(0.02)
            assert victim is not None and staged and proc.poll() is None, (
                f"no featurize actor mid-dataset to disturb:\n{log_path.read_text()}"
            )
            staged_rows = sum(pq.read_metadata(p).num_rows for p in output.glob("_staging/*/blocks/*.pqt"))
            victim.kill()
            assert not victim.processes()
            code = proc.wait(timeout=JOB_TIMEOUT + 60)
        finally:
            if proc.poll() is None:
                proc.kill()
                cluster.stop_job(submission_id)
        out = log_path.read_text()
        assert code == 0, out
        assert "SUCCEEDED" in out and cluster.token not in out
        # the crash: on the actor's first batch, before anything was written
        assert marker.exists() and "injected crash of actor process" in out
        # the node loss: with blocks still to do, and seen by Ray (its health check marks the node dead
        # within seconds; the job's log says so only if the job is still running then)
        assert staged_rows < ROWS  # blocks still to do when the node died
        deadline = time.monotonic() + 60
        while cluster.alive_nodes() != len(cluster.nodes) - 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert cluster.alive_nodes() == len(cluster.nodes) - 1, "Ray never marked the lost node dead"
        assert_complete(output, read_features(reference[0]))
    finally:
        for node in gpu_nodes:
            cluster.nodes.pop(node.name, None)
            node.stop()
