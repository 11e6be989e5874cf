"""Run a fungi command on a Ray cluster as a Ray job, the way Ray users submit work.

``fungi submit --address http://<head>:8265 -- featurize ...`` sends ``fungi featurize ...``
to the cluster's job server through Ray's :class:`~ray.job_submission.JobSubmissionClient`,
prints the job id, follows the job's logs and exits with the job's status: 0 when it
SUCCEEDED, the driver's exit code (else 1) when it FAILED or was STOPPED.

Authentication follows Ray's token auth (Ray >= 2.52): with ``RAY_AUTH_MODE=token`` the
token is read from ``RAY_AUTH_TOKEN``, else the file named by ``RAY_AUTH_TOKEN_PATH``, else
``~/.ray/auth_token``, and sent as a bearer token. It is never printed, never put in the
job's runtime env, and any echo of it in the job's logs is masked.
"""
from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# never uploaded with --working-dir (Ray also honours .gitignore)
DEFAULT_EXCLUDES = [
    ".git", ".venv", "venv", "**/__pycache__", "*.egg-info", ".pytest_cache",
    ".ipynb_checkpoints", "build", "dist", "fungi_out",
]
USAGE_STATS = {"RAY_USAGE_STATS_ENABLED": "0"}
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
EXIT_TIMEOUT = 124
EXIT_DETACHED = 130
AUTH_HINT = (
    "the cluster requires token authentication: set RAY_AUTH_MODE=token and provide its token "
    "in RAY_AUTH_TOKEN, in a file named by RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token"
)


class SubmitError(Exception):
    """A submission that cannot be made (bad options, unreachable or refusing server)."""


@dataclass
class SubmitOptions:
    command: list[str]
    address: str | None = None
    working_dir: str | None = None
    runtime_env_file: str | None = None
    runtime_env_json: str | None = None
    env: list[str] = field(default_factory=list)
    submission_id: str | None = None
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None
    wait: bool = True
    timeout: float | None = None


# -- address and authentication -----------------------------------------------------
def resolve_address(explicit: str | None) -> str:
    """--address, else RAY_API_SERVER_ADDRESS, else an http(s) RAY_ADDRESS, else the local default."""
    if explicit:
        return explicit
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = os.environ.get(name, "")
        if value.startswith(("http://", "https://")) or (value and name == "RAY_API_SERVER_ADDRESS"):
            return value
    return DEFAULT_ADDRESS


def find_token() -> tuple[str | None, str]:
    """(token, where it came from) in Ray's order of precedence; the description never holds the token."""
    value = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if value:
        return value, "RAY_AUTH_TOKEN"
    path_var = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path_var:
        path = Path(path_var).expanduser()
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token file ({exc.strerror})") from None
        if not value:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path}: the token file is empty")
        return value, f"RAY_AUTH_TOKEN_PATH ({path})"
    path = Path.home() / ".ray" / "auth_token"
    try:
        value = path.read_text().strip()
    except OSError:
        value = ""
    return (value or None), str(path)


def auth_headers() -> tuple[dict[str, str], str | None]:
    """HTTP headers for the job server, and the token to mask in anything printed.

    Like Ray's own clients, a token is sent only when ``RAY_AUTH_MODE=token``: an address
    given explicitly never receives the local token by accident.
    """
    mode = os.environ.get("RAY_AUTH_MODE", "").strip().lower()
    if mode != "token":
        return {}, None
    token, source = find_token()
    if not token:
        raise SubmitError(
            f"RAY_AUTH_MODE=token but no token found (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, {source})"
        )
    return {"Authorization": f"Bearer {token}"}, token


class Output:
    """Writes to the terminal with the token masked."""

    def __init__(self, out: TextIO, err: TextIO, secret: str | None = None) -> None:
        self.out, self.err, self.secret = out, err, secret

    def _mask(self, text: str) -> str:
        return text.replace(self.secret, "***") if self.secret else text

    def log(self, text: str) -> None:
        self.out.write(self._mask(text))
        self.out.flush()

    def note(self, text: str) -> None:
        self.err.write(self._mask(text) + "\n")
        self.err.flush()


# -- what to run, and where ------------------------------------------------------------
def build_entrypoint(command: list[str]) -> str:
    """``fungi <command ...>`` as a shell line, after checking it parses as a fungi command here."""
    from pipelines.cli import build_parser

    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise SubmitError("nothing to submit: give a fungi command after --, e.g. -- featurize --input ...")
    if command[0] == "submit":
        raise SubmitError("a submitted job cannot itself run 'fungi submit'")
    try:
        build_parser().parse_args(command)
    except SystemExit as exc:  # argparse already printed the usage error
        raise SubmitError(f"invalid fungi command: fungi {shlex.join(command)}") from exc
    return shlex.join(["fungi", *command])


def build_runtime_env(options: SubmitOptions) -> dict[str, Any]:
    """The job's runtime env: --runtime-env file, then --runtime-env-json, --working-dir, --env."""
    import yaml

    runtime_env: dict[str, Any] = {}
    if options.runtime_env_file:
        try:
            loaded = yaml.safe_load(Path(options.runtime_env_file).read_text()) or {}
        except OSError as exc:
            raise SubmitError(f"--runtime-env {options.runtime_env_file}: {exc.strerror}") from None
        if not isinstance(loaded, dict):
            raise SubmitError(f"--runtime-env {options.runtime_env_file}: not a YAML mapping")
        runtime_env.update(loaded)
    if options.runtime_env_json:
        try:
            extra = json.loads(options.runtime_env_json)
        except ValueError as exc:
            raise SubmitError(f"--runtime-env-json: {exc}") from None
        if not isinstance(extra, dict):
            raise SubmitError("--runtime-env-json must be a JSON object")
        env_vars = {**runtime_env.get("env_vars", {}), **extra.pop("env_vars", {})}
        runtime_env.update(extra)
        if env_vars:
            runtime_env["env_vars"] = env_vars
    if options.working_dir:
        runtime_env["working_dir"] = options.working_dir
    env_vars = {str(k): str(v) for k, v in (runtime_env.get("env_vars") or {}).items()}
    for item in options.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SubmitError(f"--env {item!r}: use NAME=VALUE")
        env_vars[name] = value
    for name, value in USAGE_STATS.items():
        env_vars.setdefault(name, value)
    leaked = sorted(n for n in env_vars if n in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"))
    if leaked:
        raise SubmitError(
            f"refusing to put {', '.join(leaked)} in the job's runtime env (it is visible in the dashboard); "
            "the cluster's nodes hold the token"
        )
    runtime_env["env_vars"] = env_vars
    working_dir = runtime_env.get("working_dir")
    if working_dir and "://" not in str(working_dir):
        path = Path(working_dir).expanduser()
        if not path.is_dir():
            raise SubmitError(f"working dir {working_dir} is not a directory")
        runtime_env["working_dir"] = str(path.resolve())
        runtime_env.setdefault("excludes", list(DEFAULT_EXCLUDES))
    return runtime_env


# -- the job server ----------------------------------------------------------------------
def make_client(address: str, headers: dict[str, str]):
    """A JobSubmissionClient for ``address`` exactly (Ray would let RAY_ADDRESS override it)."""
    from ray.job_submission import JobSubmissionClient

    saved = {name: os.environ.pop(name) for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if name in os.environ}
    try:
        return JobSubmissionClient(address, headers=dict(headers))
    finally:
        os.environ.update(saved)


def explain(exc: BaseException, address: str) -> str:
    """A one-line reason for a failed request, with a hint for authentication errors."""
    from ray.exceptions import AuthenticationError

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, AuthenticationError) or "status code 401" in text:
        if "Forbidden" in str(exc) or "403" in text:
            return f"{address} refused the token (403 Forbidden): it is not this cluster's token"
        return f"{address} refused the request (401 Unauthorized): {AUTH_HINT}"
    if isinstance(exc, ConnectionError) or type(exc).__name__ == "ConnectionError":
        return f"cannot reach the Ray job server at {address}: {text}"
    return text


def follow(
    client: Any, job_id: str, output: Output, deadline: float | None, address: str = "", poll_s: float = 1.0
) -> str:
    """Print the job's logs as they come; return its final status (or 'TIMEOUT')."""
    printed = 0

    def write(chunk: str) -> None:
        nonlocal printed
        printed += len(chunk)
        output.log(chunk)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        asyncio.run(asyncio.wait_for(tail(), timeout=remaining))
    except (asyncio.TimeoutError, TimeoutError):
        return "TIMEOUT"
    except Exception as exc:  # noqa: BLE001 - the log stream broke: fall back to polling
        output.note(f"fungi: log stream interrupted ({explain(exc, address)}); polling the job status")
    while True:
        status = _status_name(client.get_job_status(job_id))
        if status in TERMINAL:
            break
        if deadline is not None and time.monotonic() > deadline:
            return "TIMEOUT"
        time.sleep(poll_s)
    try:
        logs = client.get_job_logs(job_id)
        if len(logs) > printed:
            write(logs[printed:])
    except Exception:  # noqa: BLE001 - logs are best effort once the status is known
        pass
    return status


def exit_code(status: str, info: Any) -> int:
    if status == "SUCCEEDED":
        return 0
    code = getattr(info, "driver_exit_code", None)
    return code if isinstance(code, int) and code > 0 else 1


def submit(options: SubmitOptions, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Submit, follow and return the exit code (see the module docstring)."""
    output = Output(out or sys.stdout, err or sys.stderr)
    address = resolve_address(options.address)
    try:
        entrypoint = build_entrypoint(options.command)
        runtime_env = build_runtime_env(options)
        headers, secret = auth_headers()
        output.secret = secret
    except SubmitError as exc:
        output.note(f"error: {exc}")
        return 2
    try:
        client = make_client(address, headers)
        job_id = client.submit_job(
            entrypoint=entrypoint,
            runtime_env=runtime_env,
            submission_id=options.submission_id,
            entrypoint_num_cpus=options.entrypoint_num_cpus,
            entrypoint_num_gpus=options.entrypoint_num_gpus,
            metadata={"fungi.command": options.command[0] if options.command else ""},
        )
    except Exception as exc:  # noqa: BLE001 - connection, authentication, server-side refusal
        output.note(f"error: {explain(exc, address)}")
        return 2
    output.note(f"fungi: submitted job {job_id} to {address}: {entrypoint}")
    if not options.wait:
        output.log(job_id + "\n")
        return 0
    deadline = None if options.timeout is None else time.monotonic() + options.timeout
    try:
        status = follow(client, job_id, output, deadline, address)
    except KeyboardInterrupt:
        output.note(
            f"fungi: detached; job {job_id} keeps running. Follow it with "
            f"`ray job logs -f {job_id} --address {address}`, stop it with `ray job stop {job_id} --address {address}`"
        )
        return EXIT_DETACHED
    except Exception as exc:  # noqa: BLE001
        output.note(f"error: lost track of job {job_id}: {explain(exc, address)}")
        return 2
    if status == "TIMEOUT":
        output.note(f"error: job {job_id} still running after --timeout {options.timeout:g} s; stopping it")
        try:
            client.stop_job(job_id)
        except Exception as exc:  # noqa: BLE001
            output.note(f"error: could not stop job {job_id}: {explain(exc, address)}")
        return EXIT_TIMEOUT
    info = _job_info(client, job_id)
    message = (getattr(info, "message", None) or "").strip()
    code = exit_code(status, info)
    line = f"fungi: job {job_id} {status}"
    if status != "SUCCEEDED" and message:
        line += f": {message}"
    output.note(line if code == 0 else f"{line} (exit {code})")
    return code


def _job_info(client: Any, job_id: str) -> Any:
    try:
        return client.get_job_info(job_id)
    except Exception:  # noqa: BLE001
        return None


def _status_name(status: Any) -> str:
    return str(getattr(status, "value", status))

