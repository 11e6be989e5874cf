"""The output manifest: the commit point of a featurization run.

``_fungi_manifest.json`` at the output root names the spec, every committed data file
and a history of runs (what each night added). A run writes its files first and the
manifest last; data files the manifest does not name belong to a crashed run and are
removed by the next one.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.fs as pafs

from pipelines.storage import exists, read_text, write_text

MANIFEST_NAME = "_fungi_manifest.json"
MANIFEST_FORMAT = 1


@dataclass
class RunRecord:
    run_id: str
    mode: str
    started: str
    wall_s: float
    rows_in: int
    rows_skipped: int
    rows_written: int
    rows_replaced: int
    rows_failed: int
    input_fingerprint: str
    # seconds from the start to the first staged file, and rows/s from then on: start-up
    # (model loading, setup, Ray Data start) and steady throughput, told apart
    first_write_s: float | None = None
    steady_rows_per_s: float | None = None


@dataclass
class Manifest:
    spec: dict[str, Any]
    spec_hash: str
    files: dict[str, int] = field(default_factory=dict)
    error_files: dict[str, int] = field(default_factory=dict)
    setup_artifact: str | None = None
    runs: list[RunRecord] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(self.files.values())

    @property
    def errors(self) -> int:
        return sum(self.error_files.values())

    def to_json(self) -> str:
        data = asdict(self)
        data.update(format=MANIFEST_FORMAT, rows=self.rows, errors=self.errors)
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        data = json.loads(text)
        if data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"unsupported manifest format {data.get('format')}")
        return cls(
            spec=data["spec"],
            spec_hash=data["spec_hash"],
            files=dict(data.get("files", {})),
            error_files=dict(data.get("error_files", {})),
            setup_artifact=data.get("setup_artifact"),
            runs=[RunRecord(**run) for run in data.get("runs", [])],
        )


def read_manifest(fs: pafs.FileSystem, root: str) -> Manifest | None:
    path = f"{root}/{MANIFEST_NAME}"
    return Manifest.from_json(read_text(fs, path)) if exists(fs, path) else None


def write_manifest(fs: pafs.FileSystem, root: str, manifest: Manifest) -> None:
    write_text(fs, f"{root}/{MANIFEST_NAME}", manifest.to_json())


def fingerprint(files: list[pafs.FileInfo]) -> str:
    """Identity of an input snapshot: paths, sizes and modification times of its files."""
    digest = hashlib.sha256()
    for info in files:
        digest.update(f"{info.path}\x00{info.size}\x00{info.mtime_ns}\n".encode())
    return digest.hexdigest()[:16]
