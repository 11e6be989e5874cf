"""Local paths and object-store URIs behind one pyarrow filesystem API.

``s3://`` goes through s3fs (wrapped for pyarrow), so endpoint, region and credentials
come from the standard AWS environment and config files (``AWS_ENDPOINT_URL``,
``AWS_PROFILE``, ...), with ``--storage-options`` as explicit overrides.

Besides plain reads and writes this module gives the primitive the job's commit and lease
are built on, a durable atomic replace of a small file, and :class:`InputFile`: an input
file with its identity (size plus mtime on disks, size plus ETag on S3), so that a night
can tell unchanged input files from a listing alone (:mod:`pipelines.formats.sources`),
without reading them.
"""
from __future__ import annotations

import json
import os
import posixpath
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow.fs as pafs

from fungi_ops.errors import ConfigError


@dataclass(frozen=True)
class Location:
    """A directory or file on some filesystem; picklable, so it can travel to Ray workers.

    A relative local path is made absolute where the Location is made (the driver): a Ray
    worker resolves paths against its own working directory, so a job on a Ray it joined
    (``--address``) wrote ``--output my_features/`` beside the *workers*, not the user.
    """

    uri: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if "://" not in self.uri and not self.uri.startswith("/"):
            object.__setattr__(self, "uri", os.path.abspath(self.uri) + ("/" if self.uri.endswith("/") else ""))

    @property
    def is_s3(self) -> bool:
        """Whether the location is in an S3(-compatible) object store."""
        return self.uri.startswith(("s3://", "s3a://"))

    @property
    def path(self) -> str:
        """The path as the filesystem expects it (no scheme for S3: ``bucket/key``)."""
        if self.is_s3:
            return self.uri.split("://", 1)[1].rstrip("/")
        return self.uri.rstrip("/") or "/"

    def s3(self) -> Any:
        """The raw ``s3fs.S3FileSystem`` (listing with ETags, conditional writes); S3 only.

        Listings are never cached: fsspec shares one instance per set of options across a
        process, and a listing cached by an earlier run in the same process (a scheduler's
        worker, a notebook, a Ray worker) would show a rewritten object's old ETag, so a
        night would skip a changed file, or fail to open it (``FileExpired``). Tested.
        """
        import s3fs

        options = dict(self.storage_options)
        endpoint = options.pop("endpoint_url", None)
        client_kwargs = dict(options.pop("client_kwargs", {}))
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        options["use_listings_cache"] = False
        return s3fs.S3FileSystem(client_kwargs=client_kwargs, **options)

    def filesystem(self) -> pafs.FileSystem:
        """A pyarrow filesystem for this location (s3fs wrapped for S3, the local one otherwise)."""
        if self.is_s3:
            return pafs.PyFileSystem(pafs.FSSpecHandler(self.s3()))
        return pafs.LocalFileSystem()

    def join(self, *parts: str) -> "Location":
        """A location below this one."""
        return Location(posixpath.join(self.uri.rstrip("/"), *parts), self.storage_options)

    def child_path(self, *parts: str) -> str:
        """Filesystem path of an entry below this location."""
        return posixpath.join(self.path, *parts)

    def overlaps(self, other: "Location") -> bool:
        """Whether one location is the other or lies inside it (same store, same bucket)."""
        if self.is_s3 != other.is_s3:
            return False
        mine, theirs = self.path.rstrip("/") + "/", other.path.rstrip("/") + "/"
        return mine.startswith(theirs) or theirs.startswith(mine)


@dataclass(frozen=True)
class InputFile:
    """One input data file as listed: where it is and what identifies its current content.

    ``identity`` changes whenever the file is rewritten: the modification time in
    nanoseconds on a local or shared disk, the ETag on S3 (a content digest; S3's
    modification time has one-second resolution and would miss two writes in a second).
    A table's data file is immutable: its identity is what else decides its live rows (an
    Iceberg file's delete files, a Delta file's deletion vector), and ``read`` says how to read
    them (:class:`pipelines.formats.sources.IcebergRead` or ``DeltaRead``; None: the file as it is).
    """

    path: str
    relpath: str
    size: int
    identity: str
    read: Any = field(default=None, compare=False, repr=False)


def parse_json_object(text: str, flag: str) -> dict[str, Any]:
    """The JSON object a flag's value spells; ConfigError naming ``flag`` otherwise."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{flag} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} must be a JSON object")
    return value


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """``--storage-options`` is a JSON object passed to s3fs (e.g. endpoint_url, anon)."""
    return parse_json_object(text, "--storage-options") if text else {}


def exists(fs: pafs.FileSystem, path: str) -> bool:
    """Whether a file or directory exists at ``path``."""
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    """The whole content of a (small) file."""
    with fs.open_input_stream(path) as handle:
        return handle.read()


def write_whole(fs: pafs.FileSystem, path: str, write: Callable[[str], None], *, durable: bool = False) -> None:
    """Write a file through ``write(target)`` so that no reader ever sees it half-written.

    On S3 an object appears only when its upload completes. On a local or shared disk,
    ``write`` fills a temporary name beside ``path`` (not ending in ``.parquet``: no listing
    takes it for data) that is renamed over ``path`` once complete, so a worker killed
    mid-write leaves no truncated file under the real name. ``durable``: fsync the file
    before the rename and the directory after it, so the new content survives a power loss.
    """
    if not isinstance(fs, pafs.LocalFileSystem):
        write(path)
        return
    directory = posixpath.dirname(path)
    os.makedirs(directory, exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        write(temporary)
        if durable:
            fsync_file(fs, temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    if durable:
        fsync_directory(directory)


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Replace a small file so that readers see the old or the new content, never a part,
    and (on a disk) the new content is durable once this returns."""

    def write(target: str) -> None:
        with fs.open_output_stream(target) as handle:
            handle.write(data)

    write_whole(fs, path, write, durable=True)


def fsync_directory(directory: str) -> None:
    """Make a local directory's entries (a rename, a new file) durable."""
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def fsync_file(fs: pafs.FileSystem, path: str) -> None:
    """Flush a local file written through pyarrow to disk (no-op on object stores)."""
    if isinstance(fs, pafs.LocalFileSystem):
        handle = os.open(path, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def list_files(fs: pafs.FileSystem, path: str, suffix: str = "", recursive: bool = False) -> list[pafs.FileInfo]:
    """Files (not directories) under ``path`` ending with ``suffix``, sorted by path."""
    if not exists(fs, path):
        return []
    selector = pafs.FileSelector(path, recursive=recursive)
    return sorted(
        (info for info in fs.get_file_info(selector) if info.type == pafs.FileType.File and info.path.endswith(suffix)),
        key=lambda info: info.path,
    )


def delete_file(fs: pafs.FileSystem, path: str) -> None:
    """Delete a file if it exists."""
    if exists(fs, path):
        fs.delete_file(path)


def delete_tree(fs: pafs.FileSystem, path: str) -> None:
    """Delete a directory and everything below it, if it exists."""
    if exists(fs, path):
        fs.delete_dir(path)


def delete_empty_dir(fs: pafs.FileSystem, path: str) -> None:
    """Delete a directory if it exists and holds nothing (a run's ``_staging/`` once its own area is gone)."""
    if exists(fs, path) and not fs.get_file_info(pafs.FileSelector(path)):
        fs.delete_dir(path)


class StorageFailure(RuntimeError):
    """A store failed under a command (an unwritable folder, an S3 endpoint gone): one ``error:`` line, exit 1.

    Not a setting (exit 2): the same command can succeed once the store is back.
    """


def storage_cause(exc: BaseException) -> BaseException | None:
    """The storage error behind ``exc`` (itself one, or a Ray task's), followed through exception chains
    and Ray's task errors; None when there is none. The one that names the most: botocore's (its endpoint URL, bucket and key), else
    an ``OSError`` with a path, else the deepest ``OSError`` (a refused connection)."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
        boto: tuple[type[BaseException], ...] = (BotoCoreError, ClientError)
    except ImportError:  # no S3 support installed
        boto = ()
    found: list[BaseException] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        cause = getattr(current, "cause", None)  # a RayTaskError: its str is the remote traceback
        if isinstance(cause, BaseException):
            current = cause
            continue
        if isinstance(current, (OSError, *boto)):
            found.append(current)
        current = current.__cause__ or current.__context__
    best = next((e for e in found if isinstance(e, boto)), None) or next(
        (e for e in found if getattr(e, "filename", None)), found[-1] if found else None)
    if best is None or not (best is exc or isinstance(exc, OSError) or getattr(exc, "cause", None) is not None):
        return None  # only raised while handling a storage error: a bug, whose traceback must show
    return best


def describe_storage_error(error: BaseException) -> str:
    """``error`` in one line: its type and message (an ``OSError``'s names its path)."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"
