"""The output manifest: what an output holds, per input file, and the history of its runs.

An output's state is two objects:

* ``_fungi_manifest.json``, the small header: spec, input settings, totals, the run
  records, the setup artifact, and the name of the current sources table. Replacing it
  (one atomic write) is the commit point of a run;
* ``_fungi_log/sources-v<version>.pqt``, the **sources table**: one row per input
  file ever featurized (its relative path and identity, the data file and error file
  that hold its rows, row counts, the min and max id for pruning id look-ups, whether it
  is still in the input). Output rows are grouped by the input file they came from
  (lineage), so a night reads only new and changed input files and rewrites only their
  output files.

The header also carries ``pending`` while a commit is being applied (files still to move
out of the staging area, superseded files still to delete); the next run finishes it
(see :mod:`pipelines.formats.folder`). Reading and writing the state of 100,000 sources and a
year of nightly run records takes well under a second (``benchmarks/bench_incremental.py``).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fungi_ops.errors import ConfigError

from pipelines.layout import INTERNAL_SUFFIX, LOG_DIR, MANIFEST_NAME
from pipelines.storage import Location, exists, read_bytes, write_atomic

MANIFEST_FORMAT = 3


@dataclass
class RunRecord:
    """What one run did, in the manifest's ``runs`` list (one per run, oldest first).

    Rows: ``rows_in`` in the input (all files, read or not), ``rows_skipped`` neither
    featurized nor carried (unchanged, or failed before with the same content and not retried),
    ``rows_written`` featurized, ``rows_featurized`` given to the model (written or failed),
    ``rows_carried`` copied unchanged from another source's committed file (an input file
    rewritten, renamed or compacted: id and content hash as committed), ``rows_replaced`` of
    the written rows that had features before,
    ``rows_failed_new`` failed for the first time with this content, ``rows_failed_known``
    retried and failed again, ``rows_removed_failed`` old features removed because the
    changed row failed, ``rows_deleted`` removed by ``--prune``, ``rows_moved`` whose id
    now comes from another input file. Files: input files read, skipped unchanged and
    failed to read (named), output files opened and rewritten. ``input_version``: the
    version of an input table the run read.
    """

    run_id: str
    mode: str
    started: str
    wall_s: float
    rows_in: int
    rows_skipped: int
    rows_written: int
    rows_featurized: int = 0
    rows_carried: int = 0
    rows_replaced: int = 0
    rows_failed: int = 0
    rows_failed_new: int = 0
    rows_failed_known: int = 0
    rows_removed_failed: int = 0
    rows_deleted: int = 0
    rows_moved: int = 0
    files_read: int = 0
    files_unchanged: int = 0
    files_failed: list[str] = field(default_factory=list)
    output_files_opened: int = 0
    output_files_written: int = 0
    input_fingerprint: str = ""
    input_version: int | None = None  # the input table's version read (Delta version, Iceberg snapshot id)
    # seconds from the start to the first staged file, and rows/s from then on: start-up
    # (model loading, setup, Ray Data start) and steady throughput, told apart
    first_write_s: float | None = None
    steady_rows_per_s: float | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunRecord":
        """A record from its JSON form, ignoring fields of other versions."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def sources_schema(id_type: pa.DataType) -> pa.Schema:
    """Schema of the sources table; ``id_min``/``id_max`` have the input id column's type."""
    return pa.schema(
        [
            ("source", pa.string()),  # path relative to the input root
            ("size", pa.int64()),
            ("identity", pa.string()),  # mtime_ns on disks, ETag on S3
            ("input_rows", pa.int64()),
            ("file", pa.string()),  # data file at the output root, null when no row succeeded
            ("rows", pa.int64()),
            ("error_file", pa.string()),  # under _errors/, null when no row failed
            ("errors", pa.int64()),
            ("id_min", id_type),
            ("id_max", id_type),
            ("orphans", pa.int64()),  # rows kept that the input file no longer has
            ("present", pa.bool_()),  # in the input listing of the last run
            ("run_id", pa.string()),  # the run that wrote file and error_file
        ]
    )


@dataclass
class Manifest:
    """An output's committed state (see the module docstring)."""

    spec: dict[str, Any]
    spec_hash: str
    input: dict[str, Any]
    sources: pa.Table
    version: int = 0
    setup_artifact: str | None = None
    history: str | None = None
    runs: list[RunRecord] = field(default_factory=list)
    pending: dict[str, Any] | None = None

    @property
    def id_type(self) -> pa.DataType:
        """Arrow type of the input id column, as recorded at the first run."""
        return parse_type(self.input["id_type"])

    @property
    def sources_table_name(self) -> str:
        """Relative path of this version's sources table."""
        return f"{LOG_DIR}/sources-v{self.version:08d}{INTERNAL_SUFFIX}"

    @property
    def rows(self) -> int:
        """Rows with features."""
        return int(pc.sum(self.sources["rows"]).as_py() or 0)

    @property
    def errors(self) -> int:
        """Rows in the error tables."""
        return int(pc.sum(self.sources["errors"]).as_py() or 0)

    def data_files(self) -> list[str]:
        """Names of the committed data files (relative to the output root)."""
        return [name for name in self.sources["file"].to_pylist() if name]

    def error_files(self) -> list[str]:
        """Names of the committed error files (relative to the output root)."""
        return [name for name in self.sources["error_file"].to_pylist() if name]

    def header(self) -> dict[str, Any]:
        """The JSON header: everything but the sources table, which it names."""
        return {
            "format": MANIFEST_FORMAT,
            "version": self.version,
            "spec": self.spec,
            "spec_hash": self.spec_hash,
            "input": self.input,
            "sources_table": self.sources_table_name,
            "sources": self.sources.num_rows,
            "data_files": len(self.data_files()),
            "rows": self.rows,
            "errors": self.errors,
            "setup_artifact": self.setup_artifact,
            "history": self.history,
            "pending": self.pending,
            "runs": [asdict(run) for run in self.runs],
        }


def parse_type(name: str) -> pa.DataType:
    """The Arrow type an alias names (what :func:`type_name` writes)."""
    return pa.schema([pa.field("x", pa.type_for_alias(name))]).field("x").type


def type_name(data_type: pa.DataType) -> str:
    """The alias pyarrow parses back (``string``, ``int64``, ...), for the header."""
    name = str(data_type)
    try:
        parse_type(name)
    except ValueError as exc:
        raise ConfigError(f"id column type {data_type} is not supported; use a string or integer id") from exc
    return name


def read_header(output: Location) -> dict[str, Any] | None:
    """The manifest's JSON header alone (one small read), or None when the output has none."""
    fs = output.filesystem()
    path = output.child_path(MANIFEST_NAME)
    if not exists(fs, path):
        return None
    try:
        return json.loads(read_bytes(fs, path))
    except ValueError as exc:
        raise ConfigError(f"{output.uri}/{MANIFEST_NAME} is not valid JSON ({exc}); use --overwrite to rebuild") from exc


def read_manifest(output: Location) -> Manifest | None:
    """The committed state of an output, or None when it has no manifest."""
    header = read_header(output)
    if header is None:
        return None
    if header.get("format") != MANIFEST_FORMAT:
        raise ConfigError(
            f"output {output.uri} was written by another fungi version (manifest format {header.get('format')}, "
            f"this version reads {MANIFEST_FORMAT}); featurize into a new output, or --overwrite to rebuild it"
        )
    sources = pq.read_table(output.child_path(header["sources_table"]), filesystem=output.filesystem())
    return Manifest(
        spec=header["spec"],
        spec_hash=header["spec_hash"],
        input=header["input"],
        sources=sources,
        version=header["version"],
        setup_artifact=header.get("setup_artifact"),
        history=header.get("history"),
        runs=[RunRecord.from_dict(run) for run in header.get("runs", [])],
        pending=header.get("pending"),
    )


def write_sources_table(output: Location, manifest: Manifest) -> None:
    """Write this version's sources table (before the header that names it)."""
    fs = output.filesystem()
    fs.create_dir(output.child_path(LOG_DIR), recursive=True)
    sink = pa.BufferOutputStream()
    pq.write_table(manifest.sources, sink, compression="zstd")
    write_atomic(fs, output.child_path(manifest.sources_table_name), sink.getvalue().to_pybytes())


def write_header(output: Location, manifest: Manifest) -> None:
    """Replace the header: the commit point of a run."""
    fs = output.filesystem()
    write_atomic(fs, output.child_path(MANIFEST_NAME), json.dumps(manifest.header(), indent=1, sort_keys=True).encode())


def fingerprint(files: list[Any]) -> str:
    """Identity of an input snapshot: relative paths, sizes and identities of its files."""
    digest = hashlib.sha256()
    for info in files:
        digest.update(f"{info.relpath}\x00{info.size}\x00{info.identity}\n".encode())
    return digest.hexdigest()[:16]
