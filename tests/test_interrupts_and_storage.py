"""A run stopped from outside: Ctrl-C and SIGTERM (in process and on Ray), and a store that fails
under it (a path that cannot be written, an S3 endpoint that dies). Each ends in one line that
says what was committed, with the exit code the README's table gives, and no traceback; the next
run cleans up.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lakes import config, lake
from pipelines.cli import main
from pipelines.job import run_featurize
from pipelines.layout import LEASE_NAME

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("local_ray")  # conftest: one local Ray for the session


def featurize_command(source: Path, output: str, model_dir: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "featurize", "--input", str(source), "--output", output,
            "--modality", "text", "--model", f"hf:{model_dir}", "--batch-size", "1", *extra]


def stderr_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def without_stale_log_handlers(text: str) -> str:
    """``text`` less logging's own "--- Logging error ---" reports. Ray Data (re)configures its
    loggers' stream handlers on the ``sys.stderr`` of the moment; in a test process that can be an
    earlier test's captured stream, since closed, and every later Ray Data log line then reports
    that. A harness artifact (a CLI's stderr stays open), not a traceback of fungi's."""
    return re.sub(r"--- Logging error ---\n.*?\nArguments: [^\n]*\n", "", text, flags=re.S)  # logging.Handler.handleError


def test_ctrl_c_of_the_cli_is_one_line_and_the_next_run_cleans_up(tiny_text_dir, tmp_path):
    """Issue 34.7, as a shell user sees it: SIGINT once the run has staged its first files: one
    line, exit 130, no traceback, the lease given back, nothing committed; the next run commits every row
    and leaves no staging."""
    source, output = lake(tmp_path / "in", files=2, rows=60), tmp_path / "out"
    process = subprocess.Popen(featurize_command(source, str(output), tiny_text_dir),
                               env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=str(REPO),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (output / "_staging").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # the run holds the lease and stages its id check: 120 batches of one row to go
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stdout + stderr
    assert stderr_lines(stderr)[-1:] == ["interrupted: nothing committed; the next run cleans up"], stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert not (output / LEASE_NAME).exists() and not (output / "_fungi_manifest.json").exists()
    assert run_featurize(config(tiny_text_dir, source, output)).rows_written == 120
    assert not (output / "_staging").exists()


@pytest.mark.parametrize("signal_number, code, where", [
    (signal.SIGTERM, 143, "in process"), (signal.SIGINT, 130, "on Ray"),
])
def test_sigterm_and_ctrl_c_on_ray_are_one_line(signal_number, code, where, tiny_text_dir, tmp_path, local_ray,
                                                monkeypatch, capsys):
    """Issue 34.7: SIGTERM (Kubernetes, ``ray job stop``) is treated as Ctrl-C, with 128 + 15; Ctrl-C while
    the driver waits on Ray's actors is the same one line. The signal is sent to this process mid-stream."""
    import threading

    from pipelines.job.stream import Stream

    source, output = lake(tmp_path / "in", files=2, rows=60), tmp_path / "out"
    real = Stream.run

    def signalled_mid_stream(self, *args, **kwargs):
        if where == "on Ray":  # while the driver waits in Ray Data
            threading.Timer(3.0, os.kill, (os.getpid(), signal_number)).start()
        else:
            os.kill(os.getpid(), signal_number)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Stream, "run", signalled_mid_stream)
    extra = ["--address", local_ray, "--actors", "1"] if where == "on Ray" else []
    code_now = main(["featurize", "--input", str(source), "--output", str(output), "--modality", "text",
                     "--model", f"hf:{tiny_text_dir}", "--batch-size", "1", *extra])
    assert code_now == code
    err = capsys.readouterr().err  # on Ray, Ray Data's INFO lines on the dataset it started come first
    assert stderr_lines(err)[-1:] == ["interrupted: nothing committed; the next run cleans up"], err
    ours = without_stale_log_handlers(err)
    assert "Traceback" not in ours and "KeyboardInterrupt" not in ours, err
    assert signal.getsignal(signal.SIGTERM) is not None and not (output / LEASE_NAME).exists()
    monkeypatch.undo()
    assert run_featurize(config(tiny_text_dir, source, output)).rows_written == 120
    assert not (output / "_staging").exists()


def test_an_interrupt_after_the_commit_point_says_the_features_are_committed(tiny_text_dir, tmp_path, monkeypatch,
                                                                              capsys):
    """Issue 34.7: the line tells the truth when the run stopped after its commit point."""
    import pipelines.formats.base as base

    source, output = lake(tmp_path / "in", files=2, rows=2), tmp_path / "out"

    def interrupt_after_commit(count: int, what: str) -> None:
        if "commit point" in what:
            raise KeyboardInterrupt

    monkeypatch.setattr(base, "crash_from_env", lambda: interrupt_after_commit)
    code = main(["featurize", "--input", str(source), "--output", f"delta:{output}", "--modality", "text",
                 "--model", f"hf:{tiny_text_dir}"])
    err = capsys.readouterr().err
    assert code == 130 and stderr_lines(err) == [
        "interrupted: this run's features were committed (its commit point had passed); the next run finishes its "
        "clean-up"
    ], err
    monkeypatch.undo()
    assert run_featurize(config(tiny_text_dir, source, f"delta:{output}", incremental=True)).rows_written == 0
    assert not (output / "_staging").exists()


def test_a_path_that_cannot_be_written_is_one_error_line(tiny_text_dir, tmp_path, capsys):
    """Issue 31.9: a store error at the output (here a file where a folder is needed; a read-only folder
    fails the same way, but tests run as root) names the path and what was committed, exit 1, no traceback."""
    source = lake(tmp_path / "in", files=1, rows=2)
    (tmp_path / "a-file").write_text("not a folder")
    output = tmp_path / "a-file" / "out"
    code = main(["featurize", "--input", str(source), "--output", str(output), "--modality", "text",
                 "--model", f"hf:{tiny_text_dir}"])
    lines = stderr_lines(capsys.readouterr().err)
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith("error: storage failed: NotADirectoryError: [Errno 20] Not a directory: ")
    assert str(output) in lines[0] and "nothing was committed" in lines[0]


def test_an_s3_endpoint_that_dies_mid_run_is_one_error_line(tiny_text_dir, tmp_path, monkeypatch, capsys):
    """Issue 31.9: the S3 endpoint goes away after the run took its lease: one line naming the endpoint
    and the output, nothing committed (exit 1), instead of a chain of tracebacks."""
    import s3fs
    from moto.server import ThreadedMotoServer

    from pipelines.job import FeaturizeJob

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(key, value)
    # moto keeps its buckets per process: a name no other test makes
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}).mkdir("dying-endpoint")
    source = lake(tmp_path / "in", files=2, rows=2)
    real = FeaturizeJob.featurize_and_commit

    def endpoint_dies(self, *args, **kwargs):
        server.stop()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FeaturizeJob, "featurize_and_commit", endpoint_dies)
    try:
        code = main(["featurize", "--input", str(source), "--output", "s3://dying-endpoint/features",
                     "--modality", "text",
                     "--model", f"hf:{tiny_text_dir}", "--storage-options",
                     '{"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}'])
    finally:
        server.stop()
    lines = stderr_lines(capsys.readouterr().err)
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith("error: storage failed: ") and endpoint in lines[0], lines
    assert "output s3://dying-endpoint/features" in lines[0] and "nothing was committed" in lines[0]


def test_only_a_storage_error_itself_is_reported_as_one_line():
    """A bug raised while handling a storage error keeps its traceback (storage_cause gives None); a storage
    error, or one botocore raised under it, is found, the one naming the endpoint preferred."""
    from botocore.exceptions import EndpointConnectionError

    from pipelines.storage import storage_cause

    def raised(make):
        try:
            make()
        except Exception as exc:  # noqa: BLE001 - what the CLI receives
            return exc

    def bug_while_handling():
        try:
            open("/nonexistent/fungi")
        except FileNotFoundError:
            raise KeyError("a bug")

    def endpoint_gone():
        try:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9/lake/x")
        except EndpointConnectionError as exc:
            raise OSError("s3fs's wrapping") from exc

    assert storage_cause(raised(bug_while_handling)) is None
    assert isinstance(storage_cause(raised(endpoint_gone)), EndpointConnectionError)


# A process in the state a cancelled task leaves behind when the cancel lands while it imports
# torch: the import raised KeyboardInterrupt part-way, leaving torch's submodules without torch.
CUT_SHORT_TORCH_IMPORT = '''
import sys

class CutShort:
    def find_spec(self, name, path=None, target=None):
        if name == "torch.nn":
            raise KeyboardInterrupt

sys.meta_path.insert(0, CutShort())
try:
    import torch
except KeyboardInterrupt:
    pass
sys.meta_path.pop(0)
'''


def test_a_ray_worker_whose_torch_import_was_cut_short_leaves_and_its_task_runs_on_a_fresh_one(tmp_path):
    """Ray reuses a worker after cancelling its task (Ray Data cancels its tasks when a run is
    stopped); a worker whose torch import was cut short then failed the next run's setup draw with
    ``module 'torch' has no attribute '_utils'`` (CI, stop 30). Such a worker now exits, and Ray
    runs the task on a fresh one. (The stream's decode tasks and actors make the same check.)"""
    script = f'''
import json, os, pickle, sys
import ray
from pipelines.tasks import RayTasks

ray.init(num_cpus=1, include_dashboard=False)

def poison():
    exec({CUT_SHORT_TORCH_IMPORT!r}, {{}})
    return os.getpid(), sys.modules.get("torch") is None and "torch._C" in sys.modules

def load_a_pickled_tensor(data):
    return os.getpid(), int(pickle.loads(data).sum())

tensor = ray.get(ray.remote(max_calls=1)(lambda: __import__("pickle").dumps(__import__("torch").arange(4))).remote())
poisoned, cut_short = ray.get(ray.remote(poison).remote())
tasks = RayTasks()
ran_on, total = tasks.get(tasks.remote(load_a_pickled_tensor)(tensor))
print(json.dumps(dict(cut_short=cut_short, moved=ran_on != poisoned, total=total)))
'''
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == '{"cut_short": true, "moved": true, "total": 6}', done.stdout
    assert "this Ray worker exits, and Ray retries its task on a fresh one" in done.stderr


def test_a_driver_whose_torch_import_was_cut_short_is_told_to_restart(tmp_path):
    """In a driver (a notebook after a Ctrl-C during ``import torch``) the same state is one error
    that says what to do, not an AttributeError from deep in torch."""
    script = CUT_SHORT_TORCH_IMPORT + '''
from fungi_ops.errors import FungiError
from pipelines.ray_runtime import leave_if_torch_import_was_interrupted
try:
    leave_if_torch_import_was_interrupted()
except FungiError as exc:
    print(exc)
'''
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "torch's import in this process was interrupted earlier (a cancelled task or a Ctrl-C during the import); "
        "it cannot be imported again in this process: restart this Python process (in a notebook, restart the kernel)"
    )
