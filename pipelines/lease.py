"""One writer per output: a lease file created atomically, renewed while the run lives.

``<output>/_fungi_lease.json`` names its holder (host, pid, run id, start, last renewal) and
the holder's own ``--lease-timeout``. It is created with an exclusive create: ``O_CREAT |
O_EXCL`` under an ``flock`` on local and shared disks, a conditional ``PutObject`` with
``If-None-Match: *`` on S3 (S3, MinIO and Ceph support it). A second run on the same output
finds the lease and stops with exit code 2, naming the holder, before touching anything.

The holder renews the lease every ``timeout / 4`` from a background thread, with a
compare-and-swap (``If-Match`` on the ETag on S3, the ``flock`` on disks). A lease whose
holder died is taken over with the same compare-and-swap when

* its holder ran on this host and that process no longer exists (a ``kill -9`` followed
  by a rerun needs no wait), or
* it was not renewed for the timeout its *holder* recorded (a holder on another machine):
  a run started with a short ``--lease-timeout`` judges nobody else's lease by it, or
* the user passes ``--break-lease``.

A holder that finds its lease taken (it was paused for longer than its timeout) stops
before its commit: :meth:`OutputLease.check` raises.

On disks the lock file ``_fungi_lease.json.lock`` exists only while a process changes the
lease (milliseconds): it is deleted before its ``flock`` is let go, and a process that
locked a lock file that was deleted meanwhile locks the new one. The wait for it is bounded
(``LOCK_WAIT_S``): a process stopped while it holds the lock (``SIGSTOP``, a frozen VM)
refuses the next run with a message instead of hanging it; ``--break-lease`` deletes that
lock file.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Iterator

from fungi_ops.errors import ConfigError

from pipelines.layout import LEASE_NAME
from pipelines.storage import Location

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, as written in the lease file."""

    run_id: str
    host: str
    pid: int
    process_started: float
    started: str
    renewed: float
    timeout_s: float | None = None  # the holder's --lease-timeout (None: a lease an older fungi wrote)

    def describe(self) -> str:
        """One line for error messages."""
        renewed = datetime.fromtimestamp(self.renewed, timezone.utc).isoformat(timespec="seconds")
        return f"run {self.run_id} (host {self.host}, pid {self.pid}, started {self.started}, last renewed {renewed})"

    def is_stale(self, default_timeout_s: float) -> bool:
        """Not renewed for the holder's own timeout: its run is dead (or paused for longer than it allowed).

        The holder's timeout, not the caller's: a run started with ``--lease-timeout 1`` must not
        take over a live lease renewed every 150 s (a timeout of 600 s).
        """
        return time.time() - self.renewed > (self.timeout_s or default_timeout_s)

    def is_dead_here(self) -> bool:
        """True when the holder ran on this host and its process is gone (or the pid was reused)."""
        if self.host != socket.gethostname():
            return False
        import psutil

        try:
            return abs(psutil.Process(self.pid).create_time() - self.process_started) > 1.0
        except psutil.NoSuchProcess:
            return True


class LeaseHeld(ConfigError):
    """The output is being written by another run."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over by another run: it must not commit."""


LOCK_WAIT_S = 30.0  # the lock is held for milliseconds; 30 s without it means its holder is stopped
LOCK_POLL_S = 0.05


class _LocalBackend:
    """Lease file on a local or shared disk: mutations serialised by ``flock`` on a lock file.

    The lock file exists only while one process holds it (see the module docstring).
    """

    def __init__(self, path: str, output_uri: str, *, break_lock: bool = False) -> None:
        self.path = path
        self.lock_path = path + ".lock"
        self.output_uri = output_uri
        self.break_lock = break_lock

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        handle = self._lock()
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.lock_path)  # before the lock is let go: a waiter on this file then retries
            os.close(handle)  # releases the lock

    def _lock(self) -> int:
        """A descriptor of the current lock file, locked; :class:`LeaseHeld` after ``LOCK_WAIT_S``."""
        import fcntl

        deadline, broken = time.monotonic() + LOCK_WAIT_S, False
        while True:
            handle = os.open(self.lock_path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(handle)
                if time.monotonic() < deadline:
                    time.sleep(LOCK_POLL_S)
                    continue
                if not self.break_lock or broken:
                    raise LeaseHeld(
                        f"the lock {self.lock_path} of the lease of {self.output_uri} has been held for "
                        f"{LOCK_WAIT_S:.0f} s by a process that does not let go of it (stopped with SIGSTOP or "
                        "Ctrl-Z, or on a frozen machine); nothing was committed. Resume or end that process; if "
                        "no run of this output is alive, pass --break-lease (it deletes the lock)"
                    ) from None
                log.warning("deleting the lock %s, held for %.0f s (--break-lease)", self.lock_path, LOCK_WAIT_S)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.lock_path)
                deadline, broken = time.monotonic() + LOCK_WAIT_S, True
                continue
            if _same_file(handle, self.lock_path):
                return handle
            os.close(handle)  # its holder deleted it before letting go: lock the new one

    def read(self) -> tuple[dict | None, Any]:
        try:
            with open(self.path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return None, None
        return json.loads(data), data

    def create(self, body: bytes) -> bool:
        with self._locked():
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            os.write(handle, body)
            os.fsync(handle)
            os.close(handle)
            return True

    def swap(self, expected: Any, body: bytes) -> bool:
        with self._locked():
            _, current = self.read()
            if current != expected:
                return False
            temporary = f"{self.path}.tmp-{os.getpid()}"
            with open(temporary, "wb") as handle:
                handle.write(body)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
            return True

    def delete(self, expected: Any) -> None:
        with self._locked():
            _, current = self.read()
            if current == expected:
                os.unlink(self.path)


class _S3Backend:
    """Lease object on S3: conditional PUTs on the object's ETag."""

    def __init__(self, location: Location, path: str) -> None:
        self.fs = location.s3()
        self.bucket, self.key = path.split("/", 1)

    def read(self) -> tuple[dict | None, Any]:
        from fsspec.asyn import sync

        async def get() -> tuple[bytes, str]:
            response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            async with response["Body"] as stream:
                return await stream.read(), response["ETag"]

        try:
            body, etag = sync(self.fs.loop, get)  # content and ETag of the same version
        except FileNotFoundError:
            return None, None
        return json.loads(body), etag

    def _put(self, body: bytes, **condition: str) -> bool:
        try:
            self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=body, **condition)
        except (FileExistsError, PermissionError, OSError) as exc:
            if _precondition_failed(exc):
                return False
            raise
        return True

    def create(self, body: bytes) -> bool:
        return self._put(body, IfNoneMatch="*")

    def swap(self, expected: Any, body: bytes) -> bool:
        return self._put(body, IfMatch=expected)

    def delete(self, expected: Any) -> None:
        _, current = self.read()
        if current == expected:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key)


def _same_file(handle: int, path: str) -> bool:
    """Whether the open ``handle`` is the file now at ``path`` (not one deleted since it was opened)."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(handle)
    return (opened.st_dev, opened.st_ino) == (now.st_dev, now.st_ino)


def _precondition_failed(exc: Exception) -> bool:
    text = f"{type(exc).__name__} {exc}"
    return isinstance(exc, FileExistsError) or "PreconditionFailed" in text or "pre-conditions" in text or "412" in text


class OutputLease:
    """The lease of one run on one output; use as a context manager around the whole write."""

    def __init__(self, output: Location, run_id: str, *, timeout_s: float, break_lease: bool = False) -> None:
        if timeout_s <= 0:
            raise ConfigError("--lease-timeout must be > 0 seconds")
        self.output = output
        self.run_id = run_id
        self.timeout_s = timeout_s
        self.break_lease = break_lease
        path = output.child_path(LEASE_NAME)
        self.backend = (_S3Backend(output, path) if output.is_s3
                        else _LocalBackend(path, output.uri, break_lock=break_lease))
        self._version: Any = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.took_over: Holder | None = None

    def _body(self) -> bytes:
        import psutil

        holder = Holder(
            run_id=self.run_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            process_started=psutil.Process().create_time(),
            started=getattr(self, "_started", None) or datetime.now(timezone.utc).isoformat(timespec="seconds"),
            renewed=time.time(),
            timeout_s=self.timeout_s,
        )
        self._started = holder.started
        return json.dumps(asdict(holder)).encode()

    def _read(self) -> tuple[Holder | None, Any]:
        data, version = self.backend.read()
        return (Holder(**data) if data else None), version

    def acquire(self) -> None:
        """Take the lease, or raise :class:`LeaseHeld` naming the live holder."""
        for _ in range(5):
            body = self._body()
            if self.backend.create(body):
                self._version = self.backend.read()[1]
                break
            holder, version = self._read()
            if holder is None:
                continue  # released between our create and read: try again
            if not (self.break_lease or holder.is_stale(self.timeout_s) or holder.is_dead_here()):
                raise LeaseHeld(
                    f"output {self.output.uri} is being written by {holder.describe()}; "
                    f"wait for it, or if that run is dead pass --break-lease "
                    f"(a lease not renewed for its run's --lease-timeout, "
                    f"{holder.timeout_s or self.timeout_s:.0f} s, is taken over)"
                )
            if self.backend.swap(version, body):
                self.took_over = holder
                log.warning("took over the lease of %s", holder.describe())
                self._version = self.backend.read()[1]
                break
        else:
            raise LeaseHeld(f"could not take the lease of {self.output.uri}: other runs keep changing it")
        self._thread = threading.Thread(target=self._renew_loop, name="fungi-lease", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.timeout_s / 4):
            with self._lock:
                try:
                    if not self.backend.swap(self._version, self._body()):
                        holder, _ = self._read()
                        self._lost = holder.describe() if holder else "nobody (the lease file was deleted)"
                        return
                    self._version = self.backend.read()[1]
                except Exception as exc:  # noqa: BLE001 - a transient store error: retry next period
                    log.warning("could not renew the lease of %s: %s", self.output.uri, exc)

    def check(self, stopped: str = "nothing was committed") -> None:
        """Raise :class:`LeaseLost` if another run took the lease; called right before a commit.

        ``stopped`` says what the holder leaves as it stops there.
        """
        with self._lock:
            holder, version = self._read()
            if self._lost or holder is None or holder.run_id != self.run_id or version != self._version:
                raise LeaseLost(
                    f"this run's lease on {self.output.uri} was taken over by "
                    f"{self._lost or (holder.describe() if holder else 'nobody')}; {stopped}"
                )

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread:
            self._thread.join()
        with self._lock:
            if not self._lost and self._version is not None:
                self.backend.delete(self._version)

    def __enter__(self) -> "OutputLease":
        try:
            self.acquire()
        except BaseException:  # Ctrl-C right after the lease was created: give it back
            self.release()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()
