"""Local paths and object-store URIs behind one pyarrow filesystem API.

``s3://`` goes through s3fs (wrapped for pyarrow), so endpoint, region and credentials
come from the standard AWS environment and config files (``AWS_ENDPOINT_URL``,
``AWS_PROFILE``, ...), with ``--storage-options`` as explicit overrides.
"""
from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs


@dataclass(frozen=True)
class Location:
    """A directory or file on some filesystem; picklable, so it can travel to Ray workers."""

    uri: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith(("s3://", "s3a://"))

    @property
    def path(self) -> str:
        """The path as the filesystem expects it (no scheme for S3: ``bucket/key``)."""
        if self.is_s3:
            return self.uri.split("://", 1)[1].rstrip("/")
        return posixpath.abspath(self.uri) if not self.uri.startswith("/") else self.uri.rstrip("/") or "/"

    def filesystem(self) -> pafs.FileSystem:
        if self.is_s3:
            import s3fs

            options = dict(self.storage_options)
            endpoint = options.pop("endpoint_url", None)
            client_kwargs = dict(options.pop("client_kwargs", {}))
            if endpoint:
                client_kwargs["endpoint_url"] = endpoint
            fs = s3fs.S3FileSystem(client_kwargs=client_kwargs, **options)
            return pafs.PyFileSystem(pafs.FSSpecHandler(fs))
        return pafs.LocalFileSystem()

    def join(self, *parts: str) -> "Location":
        return Location(posixpath.join(self.uri.rstrip("/"), *parts), self.storage_options)

    def child_path(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """``--storage-options`` is a JSON object passed to s3fs (e.g. endpoint_url, anon)."""
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--storage-options is not valid JSON: {exc}") from exc
    if not isinstance(options, dict):
        raise ValueError("--storage-options must be a JSON object")
    return options


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_text(fs: pafs.FileSystem, path: str) -> str:
    with fs.open_input_stream(path) as handle:
        return handle.read().decode("utf-8")


def write_text(fs: pafs.FileSystem, path: str, text: str) -> None:
    """Write a small file via a temporary name then a move, so readers never see half of it."""
    temporary = f"{path}.tmp"
    with fs.open_output_stream(temporary) as handle:
        handle.write(text.encode("utf-8"))
    fs.move(temporary, path)


def list_files(fs: pafs.FileSystem, path: str, suffix: str = "", recursive: bool = False) -> list[pafs.FileInfo]:
    if not exists(fs, path):
        return []
    selector = pafs.FileSelector(path, recursive=recursive)
    return sorted(
        (info for info in fs.get_file_info(selector) if info.type == pafs.FileType.File and info.path.endswith(suffix)),
        key=lambda info: info.path,
    )


def delete_file(fs: pafs.FileSystem, path: str) -> None:
    if exists(fs, path):
        fs.delete_file(path)
