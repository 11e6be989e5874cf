"""What a fungi output is made of, by name: its columns, metadata keys, folders and file names.

Every module that writes or reads an output (the job's stages, the formats, the manifest,
the Feast hand-off) takes these names from here, so that one concept has one name and a
renamed file is renamed everywhere. A leaf: it imports nothing of :mod:`pipelines`, so any
module may import it without an import cycle.
"""
from __future__ import annotations

import hashlib
import posixpath
import re
from typing import TYPE_CHECKING

import pyarrow as pa

from fungi_ops.file_keys import ID_COLUMN, SPEC_HASH_KEY, SPEC_KEY

if TYPE_CHECKING:
    from pipelines.storage import Location

# -- the columns of the feature rows -----------------------------------------------------------
CONTENT_HASH_COLUMN = "content_hash"  # fungi_ops.seeding.content_hash of the payload: what "unchanged" means
EVENT_TIME_COLUMN = "event_time"
EVENT_TIME_TYPE = pa.timestamp("us", tz="UTC")

# -- the columns the job's stages add while rows flow (never written) ---------------------------
SOURCE_COLUMN = "__fungi_source"
PAYLOAD_COLUMN = "__fungi_payload"
CANON_COLUMN = "__fungi_canon"
SHAPE_COLUMN = "__fungi_shape"
ERROR_COLUMN = "__fungi_error"
STAGE_COLUMN = "__fungi_stage"
READ_STAGE = "read"  # the stage of a source that could not be read: its one error row fails the whole source

ERROR_SCHEMA = pa.schema(
    [(ID_COLUMN, pa.string()), (CONTENT_HASH_COLUMN, pa.string()), ("stage", pa.string()), ("error", pa.string())]
)
"""The rows of the ``_errors/`` files: which row failed, with which content, in which stage, why."""

# -- a table format's commit properties (the Parquet metadata keys, as text) ---------------------
SPEC_PROPERTY = SPEC_KEY.decode()
SPEC_HASH_PROPERTY = SPEC_HASH_KEY.decode()
DIMS_PROPERTY = "fungi.dims"  # JSON {column: dimension} of the vector columns
RUN_PROPERTY = "fungi.run_id"
MANIFEST_PROPERTY = "fungi.manifest"  # the fungi manifest header of a table version, relative to the root

# -- fungi's own files and folders in an output ------------------------------------------------
MANIFEST_NAME = "_fungi_manifest.json"
LOG_DIR = "_fungi_log"
LEASE_NAME = "_fungi_lease.json"
ERRORS_DIR = "_errors"
STAGING_DIR = "_staging"
SETUP_DIR = "_fungi_setup"  # the setup states (SimCLR negatives, dense supports) of the committed features
VERSIONS_DIR = "_fungi_versions"  # a table format's: one folder per committed run, that version's fungi manifest
INTERNAL_SUFFIX = ".pqt"
"""The suffix of every Parquet file fungi keeps inside an output for itself (sources tables,
error files, staged blocks): not ``.parquet``, so that a reader of the bare folder that
descends into ``_``-folders (Dask's ``read_parquet(OUT)``, Feast's file offline store) reads
only feature rows. pyarrow, Spark and DuckDB skip ``_``-folders anyway."""

# -- a run's staging area (``_staging/<run_id>/``) -----------------------------------------------
BLOCKS_DIR = "blocks"
CARRIED_DIR = "carried"
FINAL_DIR = "final"
STAGED_SUFFIX = ".staged"  # a final file waiting in the staging area: no reader of the folder takes it for data


def source_tag(source: str) -> str:
    """8 hex digits naming a source in file names (its path may hold any character)."""
    return hashlib.blake2b(source.encode("utf-8"), digest_size=4).hexdigest()


def data_file_name(source: str, run_id: str | None = None) -> str:
    """Name of a source's data file: readable, unique, flat, and the same in every version.

    With ``run_id`` (a table format, whose data files are immutable: time travel reads the
    old ones) the run's id is part of the name, so a version never replaces a file.

    ``date=2026-12-01/part-0.parquet`` -> ``date=2026-12-01.part-0-1a2b3c4d.parquet``:
    every data file sits at the output root, so ``OUT/*.parquet`` is the whole table. A
    new version replaces the old one under the same name in one rename (one overwriting
    copy on S3), so a reader of the bare directory sees a source's old rows or its new
    ones, never both (:mod:`pipelines.formats.folder`).
    """
    stem = re.sub(r"[^A-Za-z0-9=_.-]+", "_", source.removesuffix(".parquet").replace("/", "."))[-80:].lstrip("._")
    version = f"-{run_id}" if run_id else ""
    return f"{stem or 'part'}-{source_tag(source)}{version}.parquet"


def run_of_data_file(data_name: str) -> str:
    """The run id a table's data file name carries (:func:`data_file_name` with ``run_id``)."""
    return posixpath.basename(data_name).removesuffix(".parquet").rsplit("-", 1)[-1]


def error_file_name(data_name: str) -> str:
    """Name of the error file (under ``_errors/``) beside the data file ``data_name``."""
    return posixpath.basename(data_name).removesuffix(".parquet") + INTERNAL_SUFFIX


def staged_final_path(staging: Location, name: str) -> str:
    """Where a run stages the new version of the committed file ``name`` until its commit moves it in."""
    return staging.child_path(FINAL_DIR, name + STAGED_SUFFIX)


def carried_path(staging: Location, source: str) -> str:
    """Where the read task of ``source`` lists the rows it carries: ``(id, donor file)``."""
    return staging.child_path(CARRIED_DIR, f"{source_tag(source)}{INTERNAL_SUFFIX}")


def spec_metadata(spec_json: str, spec_hash: str) -> dict[bytes, bytes]:
    """The schema metadata every feature file carries."""
    return {SPEC_KEY: spec_json.encode(), SPEC_HASH_KEY: spec_hash.encode()}
