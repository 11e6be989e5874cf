"""Unit tests of `fungi submit` (pipelines/submit.py) against a fake job server client.

The real job server, token authentication and fault tolerance are in tests/test_cluster.py.
"""
from __future__ import annotations

import asyncio
import io
import json
from types import SimpleNamespace

import pytest
import yaml

from pipelines import cli
from pipelines import submit as submit_mod
from pipelines.submit import SubmitError, SubmitOptions

FEATURIZE = ["featurize", "--input", "/data/in put", "--output", "s3://b/out", "--modality", "text", "--model", "hf:x/y"]
TOKEN = "s3cr3t-token-value"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.ray/auth_token unless a test writes one


class FakeClient:
    """Just enough of JobSubmissionClient."""

    def __init__(self, statuses=("SUCCEEDED",), chunks=("line 1\n", "line 2\n"), logs=None, tail_error=None,
                 tail_delay=0.0, info=None, submit_error=None):
        self.statuses, self.chunks, self.tail_error, self.tail_delay = list(statuses), chunks, tail_error, tail_delay
        self.logs = logs if logs is not None else "".join(chunks)
        self.info = info or SimpleNamespace(message="", driver_exit_code=None)
        self.submit_error = submit_error
        self.submitted, self.stopped = [], []

    def submit_job(self, **kwargs):
        if self.submit_error:
            raise self.submit_error
        self.submitted.append(kwargs)
        return kwargs.get("submission_id") or "raysubmit_fake"

    async def tail_job_logs(self, job_id):
        for chunk in self.chunks:
            yield chunk
        if self.tail_delay:
            await asyncio.sleep(self.tail_delay)
        if self.tail_error:
            raise self.tail_error

    def get_job_status(self, job_id):
        from ray.job_submission import JobStatus

        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return JobStatus(status)

    def get_job_logs(self, job_id):
        return self.logs

    def get_job_info(self, job_id):
        return self.info

    def stop_job(self, job_id):
        self.stopped.append(job_id)
        return True


def run(client, monkeypatch, **options):
    """submit() with ``client`` as the job server; (exit code, stdout, stderr, headers sent)."""
    seen = {}

    def make_client(address, headers):
        seen.update(address=address, headers=headers)
        return client

    monkeypatch.setattr(submit_mod, "make_client", make_client)
    out, err = io.StringIO(), io.StringIO()
    code = submit_mod.submit(SubmitOptions(command=list(options.pop("command", FEATURIZE)), **options), out, err)
    return code, out.getvalue(), err.getvalue(), seen


# -- what is submitted ------------------------------------------------------------------
def test_entrypoint_is_the_checked_fungi_command_quoted_for_the_shell():
    assert submit_mod.build_entrypoint(["--", *FEATURIZE]) == (
        "fungi featurize --input '/data/in put' --output s3://b/out --modality text --model hf:x/y"
    )


@pytest.mark.parametrize(
    "command, message",
    [
        ([], "nothing to submit"),
        (["featurize", "--input", "x"], "invalid fungi command"),  # argparse: required flags missing
        (["no-such-command"], "invalid fungi command"),
        (["submit", "--", *FEATURIZE], "cannot itself run 'fungi submit'"),
    ],
)
def test_bad_commands_are_refused_before_contacting_the_cluster(command, message, monkeypatch, capsys):
    client = FakeClient()
    code, _, err, seen = run(client, monkeypatch, command=command)
    assert code == 2 and message in err
    assert not client.submitted and not seen  # no connection attempted


def test_runtime_env_merges_file_json_working_dir_and_env(tmp_path, monkeypatch):
    env_file = tmp_path / "env.yaml"
    env_file.write_text(yaml.safe_dump({"env_vars": {"A": "1", "B": "file"}, "excludes": ["big/"], "config": {"setup_timeout_seconds": 5}}))
    (tmp_path / "code").mkdir()
    monkeypatch.chdir(tmp_path)
    runtime_env = submit_mod.build_runtime_env(
        SubmitOptions(
            command=FEATURIZE, runtime_env_file=str(env_file), runtime_env_json=json.dumps({"env_vars": {"B": "json"}, "pip": ["x"]}),
            working_dir="code", env=["C=3", "D=a=b"],
        )
    )
    assert runtime_env["env_vars"] == {"A": "1", "B": "json", "C": "3", "D": "a=b", "RAY_USAGE_STATS_ENABLED": "0"}
    assert runtime_env["working_dir"] == str(tmp_path / "code")  # absolute: Ray zips it from here
    assert runtime_env["excludes"] == ["big/"]  # the file's own excludes win
    assert runtime_env["pip"] == ["x"] and runtime_env["config"] == {"setup_timeout_seconds": 5}


def test_local_working_dir_gets_default_excludes_and_remote_uris_are_left_alone(tmp_path):
    local = submit_mod.build_runtime_env(SubmitOptions(command=FEATURIZE, working_dir=str(tmp_path)))
    assert ".git" in local["excludes"] and ".venv" in local["excludes"]
    remote = submit_mod.build_runtime_env(SubmitOptions(command=FEATURIZE, working_dir="s3://bucket/code.zip"))
    assert remote["working_dir"] == "s3://bucket/code.zip" and "excludes" not in remote
    plain = submit_mod.build_runtime_env(SubmitOptions(command=FEATURIZE))
    assert plain == {"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}}


def test_shared_cluster_runtime_env_is_accepted():
    from ray.runtime_env import RuntimeEnv

    runtime_env = submit_mod.build_runtime_env(SubmitOptions(command=FEATURIZE, runtime_env_file="cluster/runtime_env.yaml"))
    RuntimeEnv(**runtime_env)
    assert runtime_env["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(env=["RAY_AUTH_TOKEN=abc"]), "refusing to put RAY_AUTH_TOKEN"),
        (dict(runtime_env_json='{"env_vars": {"RAY_AUTH_TOKEN_PATH": "/t"}}'), "refusing to put RAY_AUTH_TOKEN_PATH"),
        (dict(env=["NOVALUE"]), "use NAME=VALUE"),
        (dict(runtime_env_json="{nope"), "--runtime-env-json"),
        (dict(runtime_env_json="[1]"), "must be a JSON object"),
        (dict(runtime_env_file="/no/such/env.yaml"), "--runtime-env /no/such/env.yaml"),
        (dict(working_dir="/no/such/dir"), "is not a directory"),
    ],
)
def test_bad_runtime_envs_are_refused(options, message):
    with pytest.raises(SubmitError, match=message.replace("[", r"\[")):
        submit_mod.build_runtime_env(SubmitOptions(command=FEATURIZE, **options))


# -- where, and with which credentials -------------------------------------------------
def test_address_precedence(monkeypatch):
    assert submit_mod.resolve_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a GCS address is no job server
    assert submit_mod.resolve_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert submit_mod.resolve_address(None) == "http://head:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://api:8265")
    assert submit_mod.resolve_address(None) == "http://api:8265"
    assert submit_mod.resolve_address("http://explicit:8265") == "http://explicit:8265"


def test_explicit_address_wins_over_ray_address_in_the_client(monkeypatch):
    import ray.job_submission

    seen = {}

    class Client:
        def __init__(self, address, headers=None):
            seen.update(address=address, headers=headers, env=dict(__import__("os").environ))

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", Client)
    monkeypatch.setenv("RAY_ADDRESS", "http://elsewhere:8265")
    submit_mod.make_client("http://127.0.0.1:9999", {"Authorization": "Bearer t"})
    assert seen["address"] == "http://127.0.0.1:9999" and "RAY_ADDRESS" not in seen["env"]
    assert seen["headers"] == {"Authorization": "Bearer t"}
    assert __import__("os").environ["RAY_ADDRESS"] == "http://elsewhere:8265"  # restored


def test_token_is_sent_only_in_token_mode_from_ray_sources_in_order(monkeypatch, tmp_path):
    default = tmp_path / "home" / ".ray" / "auth_token"
    default.parent.mkdir(parents=True)
    default.write_text("from-default-file\n")
    assert submit_mod.auth_headers() == ({}, None)  # like Ray: no RAY_AUTH_MODE=token, no token sent
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert submit_mod.auth_headers() == ({"Authorization": "Bearer from-default-file"}, "from-default-file")
    path = tmp_path / "token"
    path.write_text("  from-path  \n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    assert submit_mod.auth_headers()[1] == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    assert submit_mod.auth_headers() == ({"Authorization": f"Bearer {TOKEN}"}, TOKEN)


def test_token_mode_without_a_token_is_an_error_that_names_the_sources(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(SubmitError, match="RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH"):
        submit_mod.auth_headers()
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(SubmitError, match="cannot read the token file"):
        submit_mod.auth_headers()


def test_the_token_never_reaches_the_output(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    client = FakeClient(chunks=(f"driver echoed {TOKEN}\n",))
    code, out, err, seen = run(client, monkeypatch)
    assert code == 0
    assert seen["headers"] == {"Authorization": f"Bearer {TOKEN}"}
    assert TOKEN not in out + err and "driver echoed ***" in out
    assert TOKEN not in json.dumps(client.submitted[0]["runtime_env"])


# -- following the job -----------------------------------------------------------------
def test_success_prints_the_job_id_and_the_logs_and_exits_0(monkeypatch):
    client = FakeClient()
    code, out, err, seen = run(client, monkeypatch, address="http://h:8265", submission_id="job-1", env=["X=1"])
    assert code == 0
    assert out == "line 1\nline 2\n"
    assert "fungi: submitted job job-1 to http://h:8265: fungi featurize" in err
    assert "fungi: job job-1 SUCCEEDED" in err
    (sent,) = client.submitted
    assert sent["entrypoint"].startswith("fungi featurize --input '/data/in put'")
    assert sent["runtime_env"]["env_vars"] == {"X": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    assert sent["submission_id"] == "job-1" and seen["address"] == "http://h:8265"


@pytest.mark.parametrize(
    "status, exit_code, driver_code, expected",
    [("FAILED", 2, 2, 2), ("FAILED", None, None, 1), ("STOPPED", None, None, 1)],
)
def test_exit_status_is_the_jobs(status, exit_code, driver_code, expected, monkeypatch):
    info = SimpleNamespace(message="Job entrypoint command failed with exit code 2", driver_exit_code=driver_code)
    code, out, err, _ = run(FakeClient(statuses=(status,), info=info), monkeypatch)
    assert code == expected
    assert f"{status}: Job entrypoint command failed" in err and f"(exit {expected})" in err


def test_no_wait_prints_only_the_job_id(monkeypatch):
    client = FakeClient(statuses=("RUNNING",))
    code, out, err, _ = run(client, monkeypatch, wait=False, submission_id="job-2")
    assert (code, out) == (0, "job-2\n")


def test_timeout_stops_the_job_and_exits_124(monkeypatch):
    client = FakeClient(statuses=("RUNNING",), tail_delay=5)
    code, out, err, _ = run(client, monkeypatch, timeout=0.2, submission_id="job-3")
    assert code == 124 and client.stopped == ["job-3"]
    assert "still running after --timeout 0.2 s; stopping it" in err


def test_a_broken_log_stream_falls_back_to_polling_without_repeating_logs(monkeypatch):
    client = FakeClient(
        statuses=("RUNNING", "RUNNING", "SUCCEEDED"), chunks=("first\n",), logs="first\nrest\n",
        tail_error=RuntimeError("WebSocket connection closed unexpectedly"),
    )
    monkeypatch.setattr(submit_mod.time, "sleep", lambda s: None)
    code, out, err, _ = run(client, monkeypatch)
    assert code == 0 and out == "first\nrest\n"
    assert "log stream interrupted" in err


def test_ctrl_c_detaches_and_says_how_to_follow_or_stop(monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(submit_mod, "follow", interrupted)
    code, out, err, _ = run(FakeClient(), monkeypatch, submission_id="job-4", address="http://h:8265")
    assert code == 130
    assert "ray job logs -f job-4 --address http://h:8265" in err and "ray job stop job-4" in err


@pytest.mark.parametrize(
    "status, body, expected",
    [
        (401, "Unauthorized: Missing authentication token", "401 Unauthorized): the cluster requires token authentication"),
        (403, "Forbidden: Invalid authentication token", "refused the token (403 Forbidden)"),
    ],
)
def test_authentication_refusals_are_explained(status, body, expected, monkeypatch):
    from ray._private.authentication.http_token_authentication import format_authentication_http_error
    from ray.exceptions import AuthenticationError

    error = AuthenticationError(format_authentication_http_error(status, body))
    code, out, err, _ = run(FakeClient(submit_error=error), monkeypatch, address="http://h:8265")
    assert code == 2 and expected in err and "http://h:8265" in err


def test_unreachable_server_is_a_submission_error(monkeypatch):
    error = ConnectionError("Failed to connect to Ray at address: http://h:1.")
    code, out, err, _ = run(FakeClient(submit_error=error), monkeypatch, address="http://h:1")
    assert code == 2 and "cannot reach the Ray job server at http://h:1" in err


def test_cli_wires_the_options_through(monkeypatch, tmp_path):
    client = FakeClient()
    monkeypatch.setattr(submit_mod, "make_client", lambda address, headers: client)
    code = cli.main([
        "submit", "--address", "http://h:8265", "--working-dir", str(tmp_path), "--env", "FUNGI_FAULT_INJECT_ONCE=/m",
        "--entrypoint-num-cpus", "1", "--", *FEATURIZE,
    ])
    assert code == 0
    (sent,) = client.submitted
    assert sent["entrypoint"].split()[:2] == ["fungi", "featurize"]
    assert sent["runtime_env"]["working_dir"] == str(tmp_path)
    assert sent["runtime_env"]["env_vars"]["FUNGI_FAULT_INJECT_ONCE"] == "/m"
    assert sent["entrypoint_num_cpus"] == 1.0
