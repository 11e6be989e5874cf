"""A ready Feast repository for a FUNGI feature output (``fungi feast``).

From an output's ``_fungi_manifest.json`` and its ``fungi.spec``, :func:`write_feast_repo`
writes into a Feast repository directory:

* ``fungi_<name>.py``, the definitions of one output, rewritten on every run (keep your
  own definitions in other files of the repository: they are never touched):

  - an entity ``<name>`` on the ``id`` column;
  - a ``FileSource`` on the output's Parquet files, ``timestamp_field="event_time"``:
    the folder ``OUT.history`` beside the output (every row version, append-only) when the job ran
    with ``--history``, else the glob ``OUT/*.parquet`` of the current files (then
    point-in-time joins are correct only for rows never changed; a glob because Feast's
    file offline store reads a folder recursively, ``_errors/`` included). Local paths are
    absolute; ``s3://`` keeps the endpoint (``--storage-options`` ``endpoint_url``, else
    ``AWS_ENDPOINT_URL``) as ``s3_endpoint_override``; credentials stay in the environment;
  - a feature view ``<name>_<spec hash[:8]>``: ``embedding`` (``Array(Float32)``,
    vector-indexed, ``COSINE``), each ``grad_<objective>`` (``Array(Float32)``),
    ``content_hash`` and the kept columns; tags ``fungi.spec_hash``, ``fungi.model``,
    ``fungi.objectives``, ``fungi.spec`` (the whole spec), ...;
  - a feature view ``<name>_<spec hash[:8]>_fungi`` with one vector-indexed feature
    ``fungi``: the FUNGI concatenation (each block L2-normalised, concatenated,
    L2-normalised again: cosine on it is the paper's comparison). Feast's SQLite store
    indexes one field per view and searches stored columns only, so these vectors are
    written by ``fungi feast`` as Parquet under ``data/fungi/<name>/<spec hash>/`` of the
    repository (one file per source file, refreshed when a source file is new or
    changed; ``--no-fungi-view`` leaves it out);
  - a feature service ``<name>``: both views of the output's current spec, a name that
    stays when the spec changes.

* ``feature_store.yaml`` when the repository has none: the local provider, the file
  offline store (the ``duckdb`` one for a Delta or Iceberg output: Feast's file store reads
  no Delta table), and Feast's SQLite online store with vector search (:mod:`pipelines.feast_online`);
  an existing one is never rewritten.

A Delta or Iceberg output (``delta:PATH``, ``iceberg:NS.TABLE``) is read by Feast's duckdb
offline store. Time travel is the table's own: every version keeps its data files until
``fungi vacuum``, so the source is the glob of the table's data files, every row version the
table keeps (:meth:`pipelines.formats.table.LakeTable.row_version_files`), and a
point-in-time join finds each row as it was at the entity's timestamp, back to the oldest
kept version, as ``--history`` gives a folder. With ``current_version`` (``fungi feast
--current-version``), a Delta output is a ``FileSource`` with ``file_format=DeltaFormat()``
on the table: its current rows only, point-in-time correct for rows never changed (an
Iceberg table's current snapshot is Feast's ``IcebergSource``, with the catalog's settings:
not written here).

Every run also finds the ids the output no longer holds and removes them from the online
store (:mod:`pipelines.feast_deletions`); :func:`materialize_repo` (``--materialize``)
applies and materializes first, so that the removal follows the materialization.

A second spec (another model or seed, featurized into another output) becomes another
definitions file and feature views; re-running for the same output updates its file in
place (a new spec there replaces the views of the old one).
"""
from __future__ import annotations

import importlib.util
import json
import os
import posixpath
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fungi_ops.errors import ConfigError
from pipelines.feast_deletions import remove_deleted_ids, served_folder, track_deletions
from pipelines.formats import open_output as open_table
from pipelines.formats.address import DELTA, ICEBERG, PARQUET, TableAddress, parse_address
from pipelines.formats.base import manifest_dims, restore_vectors
from pipelines.formats.folder import history_path
from pipelines.manifest import MANIFEST_NAME, Manifest
from pipelines.storage import Location, exists

ID_COLUMN = "id"
EVENT_TIME_COLUMN = "event_time"
CONTENT_HASH_COLUMN = "content_hash"
FUNGI_FEATURE = "fungi"
DEFINITIONS_PREFIX = "fungi_"
HEADER_MARK = "# fungi-feast: "
STORE_TYPE = "pipelines.feast_online.FungiSqliteOnlineStore"
DUCKDB_STORE = "duckdb"  # Feast's offline store that reads Delta and Parquet globs (a table's data files)
TABLE_NAMES = {DELTA: "a Delta", ICEBERG: "an Iceberg"}  # with their article, for messages

# Column names a FUNGI feature view cannot carry: what each collides with in Feast.
RESERVED_NAMES = {
    "event_timestamp": "the timestamp column of get_historical_features' entity dataframe",
    "distance": "the distance that vector search (retrieve_online_documents_v2) returns",
    "text_rank": "the rank that text search returns",
    "created": "the created-timestamp column of Feast's point-in-time joins",
}


@dataclass(frozen=True)
class FeatureOutput:
    """A FUNGI feature output as read from its manifest and data files (nothing loaded)."""

    uri: str
    storage_options: dict[str, Any]
    manifest: dict[str, Any]
    spec: dict[str, Any]
    spec_hash: str
    schema: pa.Schema
    data_files: tuple[pafs.FileInfo, ...]
    history_files: tuple[pafs.FileInfo, ...]
    history: str | None  # where every row version is: the history folder, or a Delta table's kept versions
    kind: str = PARQUET  # the output's format: a Parquet folder, a Delta or an Iceberg table
    data_dir: str = ""  # where a table's data files are below its root ("data/" in an Iceberg table)

    @property
    def is_s3(self) -> bool:
        """Whether the output is on S3 (``s3://`` or ``s3a://``)."""
        return self.uri.startswith(("s3://", "s3a://"))

    @property
    def root(self) -> str:
        """The output root as a FileSource wants it: absolute local path or ``s3://bucket/prefix``."""
        if self.is_s3:
            return "s3://" + self.uri.split("://", 1)[1].rstrip("/")
        return os.path.abspath(self.uri)

    @property
    def vector_columns(self) -> list[str]:
        """``embedding`` then one ``grad_<objective>`` per objective, in the spec's order."""
        return ["embedding", *(f"grad_{o['name']}" for o in self.spec.get("objectives", []))]

    def dim(self, column: str) -> int:
        """Width of a vector column."""
        return self.schema.field(column).type.list_size

    @property
    def kept_columns(self) -> list[pa.Field]:
        """The input columns the job kept (``--keep-columns``): every column but the fixed ones."""
        fixed = {ID_COLUMN, EVENT_TIME_COLUMN, CONTENT_HASH_COLUMN, *self.vector_columns}
        return [f for f in self.schema if f.name not in fixed]

    @property
    def source_files(self) -> tuple[pafs.FileInfo, ...]:
        """The files Feast reads: every row version with history, else the current rows."""
        return self.history_files if self.history else self.data_files

    @property
    def source_path(self) -> str:
        """The FileSource path: the history folder, else a glob of the top-level files.

        The glob, not the folder: Feast's file offline store (Dask) on a folder also takes
        every ``*.parquet`` below it, and Polars refuses a folder of mixed files.
        """
        if self.kind != PARQUET:
            return posixpath.join(self.root, self.data_dir, "*.parquet") if self.history else self.root
        if self.history:
            return history_path(self.root)
        return posixpath.join(self.root, "*.parquet")

    def filesystem(self) -> pafs.FileSystem:
        """The pyarrow filesystem the output is read through."""
        return Location(self.uri, self.storage_options).filesystem()

    def endpoint(self) -> str | None:
        """The S3 endpoint a FileSource needs: ``endpoint_url`` of the storage options, else ``AWS_ENDPOINT_URL``."""
        if not self.is_s3:
            return None
        return self.storage_options.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL") or None


def open_output(uri: str, storage_options: dict[str, Any] | None = None, *, current_version: bool = False,
                catalog: str | None = None) -> FeatureOutput:
    """Read an output's manifest, spec and schema; :class:`ConfigError` if it cannot feed Feast.

    ``current_version``: serve the current rows only, not every row version (a table's kept
    versions, a folder's ``--history``). ``catalog``: an Iceberg output's (``--catalog``).
    """
    options = dict(storage_options or {})
    address = parse_address(uri)
    table, location, committed = _open_committed(uri, address, options, current_version, catalog)
    fs = location.filesystem()
    manifest, spec, spec_hash = committed.header(), committed.spec, committed.spec_hash
    if address.kind != PARQUET:
        paths = table.read_files(lambda files: files or [])
        data_files = tuple(sorted(fs.get_file_info(paths), key=lambda i: i.path)) if paths else ()
    else:
        data_files = tuple(_parquet_files(fs, location.path))
    if not data_files:
        raise ConfigError(f"{uri} holds no feature files yet")
    history, history_files = _row_versions(uri, table, location, manifest.get("history") or None, current_version)
    schema = _read_schema(fs, data_files[0].path)
    if table.list_vectors:  # a table's files hold list<float>: Feast's views and the checks want the dimensions
        schema = restore_vectors(schema.empty_table(), manifest_dims(spec)).schema
    output = FeatureOutput(
        uri=location.uri if address.kind == ICEBERG else address.target, storage_options=options, manifest=manifest,
        spec=spec, spec_hash=str(spec_hash), schema=schema, data_files=data_files, history_files=history_files,
        history=history, kind=address.kind, data_dir=table.data_dir,
    )
    check_output_schema(output)
    return output


def _open_committed(uri: str, address: TableAddress, options: dict[str, Any], current_version: bool,
                    catalog: str | None) -> tuple[Any, Location, Manifest]:
    """The output (its format's handle), its folder and its committed manifest; ConfigError unless a
    committed fungi output."""
    if address.kind == ICEBERG:
        if current_version:
            raise ConfigError(
                f"{uri}: Feast reads an Iceberg table's current snapshot through its IcebergSource (with the "
                "catalog's settings): define that source yourself; fungi feast serves every row version the table keeps"
            )
        table = open_table(uri, options, catalog=catalog)
        location = table.location
    else:
        location = Location(address.target, options)
        info = location.filesystem().get_file_info(location.path)
        if info.type == pafs.FileType.NotFound:
            raise ConfigError(f"output {uri} does not exist")
        if info.type != pafs.FileType.Directory:
            raise ConfigError(f"output {uri} is not a directory: pass the folder that `fungi featurize --output` wrote")
        table = open_table(uri, options)
    committed = table.read_manifest()
    if committed is None:
        raise ConfigError(
            f"{uri} has no {MANIFEST_NAME if address.kind == PARQUET else 'fungi manifest'}: not a fungi feature "
            "output, or its first `fungi featurize` run has not committed yet"
        )
    if committed.pending:
        raise ConfigError(
            f"{uri}: the commit of run {committed.pending['run_id']} is not finished (running, or its run was killed): "
            "Feast would read some sources' new rows and others' old ones; the next `fungi featurize` on this output "
            "finishes it first, then run this again"
        )
    return table, location, committed


def _row_versions(uri: str, table: Any, location: Location, history: str | None,
                  current_version: bool) -> tuple[str | None, tuple[pafs.FileInfo, ...]]:
    """(where every row version is, its files): a table's kept versions, a folder's ``--history``
    folder; (None, ()) for the current rows only."""
    if current_version:
        return None, ()
    if table.versioned_names:
        try:
            return "the table's kept versions", tuple(table.row_version_files())
        except ConfigError as exc:
            raise ConfigError(f"{exc} (fungi feast --current-version)") from exc
    if not history:
        return None, ()
    files = tuple(_parquet_files(location.filesystem(), history_path(location.path)))
    if not files:
        raise ConfigError(f"{uri}: it was featurized with --history, but its history folder "
                          f"{history_path(location.uri)} holds no Parquet files (copy it beside the output)")
    return history, files


def check_output_schema(output: FeatureOutput) -> None:
    """The columns Feast needs, with the types it maps, and no name Feast reserves."""
    schema, uri = output.schema, output.uri
    found = (schema.metadata or {}).get(b"fungi.spec_hash", b"").decode()
    if found and found != output.spec_hash:
        raise ConfigError(
            f"{uri}: its data files are of spec {found} but the manifest says {output.spec_hash} "
            "(a run is committing? try again when it has finished)"
        )
    if ID_COLUMN not in schema.names:
        raise ConfigError(f"{uri} has no '{ID_COLUMN}' column; columns: {', '.join(schema.names)}")
    if EVENT_TIME_COLUMN not in schema.names:
        raise ConfigError(
            f"{uri} has no '{EVENT_TIME_COLUMN}' column (written by an older `fungi featurize`); Feast needs an "
            "event timestamp: featurize it again with this version"
        )
    if not pa.types.is_timestamp(schema.field(EVENT_TIME_COLUMN).type):
        raise ConfigError(f"{uri}: '{EVENT_TIME_COLUMN}' is {schema.field(EVENT_TIME_COLUMN).type}, not a timestamp")
    for column in output.vector_columns:
        if column not in schema.names:
            raise ConfigError(f"{uri}: the spec's feature column '{column}' is missing; columns: {', '.join(schema.names)}")
        kind = schema.field(column).type
        if not (pa.types.is_fixed_size_list(kind) and pa.types.is_floating(kind.value_type)):
            raise ConfigError(f"{uri}: '{column}' is {kind}, expected fixed_size_list<float32>")
    for name in [*output.vector_columns, CONTENT_HASH_COLUMN, *(f.name for f in output.kept_columns)]:
        check_feature_name(name, uri)


def check_feature_name(name: str, where: str = "the output") -> None:
    """:class:`ConfigError` when a column cannot be a Feast feature of that name."""
    if name in RESERVED_NAMES:
        raise ConfigError(
            f"column '{name}' of {where} collides with a name Feast reserves ({RESERVED_NAMES[name]}): "
            "rename it in the input, or leave it out of --keep-columns"
        )
    if name.startswith("__") or ":" in name or "@" in name:
        raise ConfigError(
            f"column '{name}' of {where} cannot be a Feast feature name (Feast reserves a leading '__', ':' and '@'): "
            "rename it in the input, or leave it out of --keep-columns"
        )


def check_event_time_column(schema: pa.Schema, name: str) -> None:
    """Validate ``--event-time-column`` against the input schema; :class:`ConfigError` with the fix.

    The column must exist and be a Parquet timestamp (any unit; without a time zone it is
    read as UTC). Dates and strings are refused rather than guessed.
    """
    if not name:
        raise ConfigError("--event-time-column is empty: name an input timestamp column, e.g. updated_at")
    if name not in schema.names:
        raise ConfigError(
            f"--event-time-column '{name}' not found in the input; columns: {', '.join(schema.names)}"
        )
    if schema.get_field_index(name) < 0:
        raise ConfigError(f"--event-time-column '{name}' names several input columns")
    kind = schema.field(name).type
    if pa.types.is_timestamp(kind):
        return
    if pa.types.is_date(kind):
        hint = "a date: store it as a timestamp (e.g. pyarrow.compute.cast(column, pa.timestamp('us', tz='UTC')))"
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
        hint = "text, which is not parsed: store it as a Parquet timestamp column"
    elif pa.types.is_integer(kind):
        hint = "an integer (epoch?): store it as a Parquet timestamp column with its unit"
    else:
        hint = "not a timestamp"
    raise ConfigError(f"--event-time-column '{name}' is {kind}, {hint}")


def fungi_vectors(table: pa.Table | pa.RecordBatch, columns: Sequence[str]) -> np.ndarray:
    """The FUNGI concatenation, float32 ``(rows, sum of dims)``, unit norm.

    Each block is L2-normalised, the blocks are concatenated in ``columns`` order and the
    result is divided by sqrt(number of blocks): cosine on it is the mean of the blocks'
    cosines, the comparison ``fungi eval`` and the paper make.
    """
    blocks = []
    for name in columns:
        block = _matrix(table.column(name))
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        blocks.append(block / np.maximum(norms, 1e-12))
    if not blocks:
        raise ValueError("no feature column to concatenate")
    return (np.concatenate(blocks, axis=1) / np.sqrt(len(blocks))).astype(np.float32)


def vector_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A ``fixed_size_list<float32>`` column as a float32 ``(rows, dim)`` array."""
    return _matrix(column)


@dataclass
class RepoUpdate:
    """What :func:`write_feast_repo` wrote."""

    repo: Path
    definitions: Path
    name: str
    entity: str
    feature_view: str
    fungi_view: str | None
    source: str
    source_kind: str  # "history" or "current"
    features: list[str]
    skipped_columns: list[str]
    config_written: bool
    fungi_files_written: int = 0
    fungi_files_kept: int = 0
    removed_views: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    deleted_found: int = 0  # ids the output lost since the last run (pipelines.feast_deletions)
    deleted_removed: int = 0  # ids removed from the online store by this run
    deleted_pending: int = 0  # ids deleted from the output that the online store may still serve
    materialized: bool = False  # `--materialize`: applied and materialized by this run

    @property
    def views(self) -> list[str]:
        """The feature views written for the output, in order."""
        return [v for v in (self.feature_view, self.fungi_view) if v]


def write_feast_repo(
    output: str,
    repo: str | os.PathLike,
    *,
    name: str | None = None,
    project: str = "fungi",
    storage_options: dict[str, Any] | None = None,
    fungi_view: bool = True,
    current_version: bool = False,
    catalog: str | None = None,
) -> RepoUpdate:
    """Write or update the Feast repository ``repo`` for the feature output ``output``.

    ``current_version``: the output's current rows only (see the module docstring); ``catalog``:
    an Iceberg output's catalog (``--catalog``).
    """
    source = open_output(output, storage_options, current_version=current_version, catalog=catalog)
    repo_path = Path(repo).resolve()
    if repo_path.exists() and not repo_path.is_dir():
        raise ConfigError(f"--repo {repo} is a file, not a directory")
    address = parse_address(output)
    default = (address.identifier[-1] if address.kind == ICEBERG else posixpath.basename(address.target.rstrip("/")))
    name = _name(name if name is not None else default or "features", explicit=name is not None)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", project):
        raise ConfigError(f"--project '{project}' must be letters, digits, '_' and '-', not starting with '_' or '-'")
    definitions = repo_path / f"{DEFINITIONS_PREFIX}{name}.py"
    previous = _read_header(definitions)
    if previous is not None and previous.get("output") != source.root:
        raise ConfigError(
            f"{definitions} serves another output ({previous.get('output')}); pass --name to add {source.root} "
            "beside it, or delete that file to replace it"
        )
    view = f"{name}_{source.spec_hash[:8]}"
    concat_view = f"{view}_fungi" if fungi_view else None
    kept, skipped = [], []
    for column in source.kept_columns:
        feast_type = _feast_type(column.type)
        if feast_type:
            kept.append((column.name, feast_type))
        else:
            skipped.append(f"{column.name} ({column.type})")
    update = RepoUpdate(
        repo=repo_path, definitions=definitions, name=name, entity=name, feature_view=view, fungi_view=concat_view,
        source=source.source_path, source_kind="history" if source.history else "current",
        features=[*source.vector_columns, CONTENT_HASH_COLUMN, *(n for n, _ in kept)], skipped_columns=skipped,
        config_written=False,
    )
    note = _source_note(output, source)
    update.notes.extend([note] if note else [])
    if skipped:
        update.notes.append(f"left out (no Feast type): {', '.join(skipped)}")
    repo_path.mkdir(parents=True, exist_ok=True)
    update.config_written = _write_config(repo_path, project, update.notes, "file" if source.kind == PARQUET else DUCKDB_STORE)
    if source.kind == DELTA and not source.history:  # DuckDB reads DeltaFormat through its delta extension
        _install_duckdb_delta(update.notes)

    mirror = _refresh_fungi_vectors(source, update, repo_path / "data" / "fungi" / name)
    if previous:
        update.removed_views = [v for v in previous.get("views", []) if v not in update.views]

    text = _definitions_source(source, update, kept, mirror)
    if not definitions.exists() or definitions.read_text() != text:
        temporary = definitions.with_suffix(".py.tmp")
        temporary.write_text(text)
        temporary.replace(definitions)
    served = served_folder(repo_path, name)
    update.deleted_found = track_deletions(source, served)
    _remove_deleted(update)
    return update


def materialize_repo(update: RepoUpdate, end: datetime | None = None) -> RepoUpdate:
    """``fungi feast --materialize``: apply the output's definitions, materialize its views up to ``end``
    (now), then remove the ids the output no longer holds from the online store.

    In this order, the removal follows the materialization, which pushes every id its window
    holds (a ``--history`` source keeps the last version of a deleted id). Only fungi's objects are
    applied (your own definitions are left to ``feast apply``); the views of the output's earlier spec
    are deleted.
    """
    from feast import FeatureStore

    store = FeatureStore(repo_path=str(update.repo))
    stale = [v for v in store.list_feature_views() if v.name in update.removed_views]
    store.apply(load_definitions(update.repo), objects_to_delete=stale, partial=not stale)
    store.materialize_incremental(end_date=end or datetime.now(timezone.utc), feature_views=update.views)
    update.materialized = True
    _remove_deleted(update)
    return update


def _remove_deleted(update: RepoUpdate) -> None:
    """Remove the pending deleted ids from the online store (see :func:`remove_deleted_ids`)."""
    removed, update.deleted_pending, note = remove_deleted_ids(update.repo, update.entity,
                                                               served_folder(update.repo, update.name))
    update.deleted_removed += removed
    if note:
        update.notes.append(note)


def _source_note(output: str, source: FeatureOutput) -> str | None:
    """What the repository's source misses or keeps, for point-in-time joins (None: a folder's --history, all)."""
    if source.kind != PARQUET and source.history:
        return (
            f"{output} is {TABLE_NAMES[source.kind]} table: Feast reads every row version it keeps "
            f"({len(source.history_files)} data files), so point-in-time joins are correct back to its oldest kept "
            "version (`fungi vacuum` retires older ones); an id deleted with --prune is still found offline at its "
            "last version (the online store drops it: see `fungi feast --materialize`)"
        )
    if source.kind == DELTA:
        return (
            f"{source.uri} is a Delta table: Feast reads its current version, so point-in-time joins are correct "
            "only for rows that never changed (without --current-version Feast reads every row version it keeps)"
        )
    if source.history:
        return None
    return (
        f"{source.uri} was featurized without --history: Feast reads its current files, so point-in-time joins "
        "are correct only for rows that never changed (featurize with --history to keep every row version)"
    )


def _refresh_fungi_vectors(source: FeatureOutput, update: RepoUpdate, vectors_root: Path) -> Path:
    """Bring the ``fungi`` vectors of the output's spec up to date under ``vectors_root`` (other specs'
    are deleted, and all of them without a fungi view); the folder of this spec's."""
    mirror = vectors_root / source.spec_hash
    if update.fungi_view:
        update.fungi_files_written, update.fungi_files_kept = _sync_fungi_vectors(source, mirror)
    for stale in sorted(vectors_root.glob("*")) if vectors_root.exists() else []:
        if stale.is_dir() and (stale != mirror or not update.fungi_view):
            shutil.rmtree(stale)
    return mirror


def load_definitions(repo: str | os.PathLike) -> list[Any]:
    """The Feast objects of the repository's ``fungi_*.py`` files, for ``FeatureStore.apply``.

    ``feast apply`` does the same from the command line (and also applies your own files);
    this is for notebooks and tests that stay in one process, where importing the files
    through Feast would reuse stale modules.
    """
    from feast import Entity, FeatureService, FeatureView, FileSource

    objects: list[Any] = []
    for path in sorted(Path(repo).glob(f"{DEFINITIONS_PREFIX}*.py")):
        try:
            ours = _read_header(path) is not None
        except ConfigError:  # a file of the user's that happens to start with fungi_
            ours = False
        if not ours:
            continue
        spec = importlib.util.spec_from_file_location(f"_fungi_feast_definitions_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        objects.extend(v for v in vars(module).values() if isinstance(v, (Entity, FeatureService, FeatureView, FileSource)))
    return objects


# --- internals ---------------------------------------------------------------------------


def _parquet_files(fs: pafs.FileSystem, folder: str) -> list[pafs.FileInfo]:
    if not exists(fs, folder):
        return []
    infos = fs.get_file_info(pafs.FileSelector(folder, recursive=False))
    return sorted(
        (
            i for i in infos
            if i.type == pafs.FileType.File and i.base_name.endswith(".parquet") and not i.base_name.startswith(("_", "."))
        ),
        key=lambda i: i.path,
    )


def _read_schema(fs: pafs.FileSystem, path: str) -> pa.Schema:
    with fs.open_input_file(path) as handle:
        return pq.read_schema(handle)


def _name(text: str, explicit: bool) -> str:
    name = re.sub(r"[^a-z0-9_]+", "_", text.lower()).strip("_")
    if explicit and name != text:
        raise ConfigError(f"--name '{text}' must be lower-case letters, digits and '_' (e.g. '{name or 'texts'}')")
    if not name:
        name = "features"
    if name[0].isdigit():
        name = f"f_{name}"
    return name


_PRIMITIVES = [
    (pa.types.is_string, "String"), (pa.types.is_large_string, "String"),
    (pa.types.is_boolean, "Bool"), (pa.types.is_float32, "Float32"), (pa.types.is_float64, "Float64"),
    (pa.types.is_int8, "Int32"), (pa.types.is_int16, "Int32"), (pa.types.is_int32, "Int32"),
    (pa.types.is_uint8, "Int32"), (pa.types.is_uint16, "Int32"), (pa.types.is_int64, "Int64"),
    (pa.types.is_uint32, "Int64"), (pa.types.is_binary, "Bytes"), (pa.types.is_large_binary, "Bytes"),
    (pa.types.is_timestamp, "UnixTimestamp"),
]


def _feast_type(kind: pa.DataType) -> str | None:
    """The Feast type (as source code) of a kept column, None when Feast has none for it."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        inner = _feast_type(kind.value_type)
        return f"Array({inner})" if inner and not inner.startswith("Array") else None
    return next((feast for test, feast in _PRIMITIVES if test(kind)), None)


def _matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        raise ValueError(f"{column.null_count} null vector(s)")
    size = column.type.list_size
    return np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(column), size)


def _sync_fungi_vectors(source: FeatureOutput, mirror: Path) -> tuple[int, int]:
    """Write the FUNGI concatenation of each source file that is new or changed; drop the rest."""
    index_path = mirror / "_sources.json"
    key = {"columns": source.vector_columns, "source": source.source_path}
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    if {k: index.get(k) for k in key} != key:
        shutil.rmtree(mirror, ignore_errors=True)
        index = {}
    mirror.mkdir(parents=True, exist_ok=True)
    known: dict[str, list] = dict(index.get("files", {}))
    files: dict[str, list] = {}
    fs = source.filesystem()
    written = 0
    for info in source.source_files:
        stamp = [info.size, info.mtime_ns]
        files[info.base_name] = stamp
        if known.get(info.base_name) == stamp and (mirror / info.base_name).exists():
            continue
        _write_fungi_file(fs, info.path, mirror / info.base_name, {c: source.dim(c) for c in source.vector_columns})
        written += 1
    for path in mirror.glob("*.parquet"):
        if path.name not in files:
            path.unlink()
    temporary = index_path.with_suffix(".tmp")
    temporary.write_text(json.dumps({**key, "files": files}, indent=1, sort_keys=True))
    temporary.replace(index_path)
    return written, len(files) - written


def _write_fungi_file(fs: pafs.FileSystem, path: str, target: Path, dims: dict[str, int]) -> None:
    """``id``, ``event_time`` and the FUNGI concatenation of the vector columns ``dims`` (name: dimension,
    in order) of one source file, written atomically; a table's ``list<float>`` vectors are read as fixed-size.

    The temporary name starts with '.', which Feast's file offline store skips.
    """
    temporary = target.with_name(f".{target.name}.tmp")
    columns, dim = list(dims), sum(dims.values())
    with fs.open_input_file(path) as handle:
        parquet = pq.ParquetFile(handle)
        source = parquet.schema_arrow
        schema = pa.schema([source.field(ID_COLUMN), source.field(EVENT_TIME_COLUMN),
                            pa.field(FUNGI_FEATURE, pa.list_(pa.float32(), dim))])
        with pq.ParquetWriter(temporary, schema) as writer:
            for batch in parquet.iter_batches(batch_size=8192, columns=[ID_COLUMN, EVENT_TIME_COLUMN, *columns]):
                batch = restore_vectors(pa.Table.from_batches([batch]), dims)
                vectors = pa.FixedSizeListArray.from_arrays(pa.array(fungi_vectors(batch, columns).reshape(-1)), dim)
                writer.write_table(pa.Table.from_arrays(
                    [batch.column(ID_COLUMN), batch.column(EVENT_TIME_COLUMN), vectors], schema=schema
                ))
    temporary.replace(target)


def _read_header(definitions: Path) -> dict[str, Any] | None:
    if not definitions.exists():
        return None
    for line in definitions.read_text().splitlines()[:5]:
        if line.startswith(HEADER_MARK):
            try:
                return json.loads(line[len(HEADER_MARK):])
            except ValueError:
                break
    raise ConfigError(f"{definitions} exists and was not written by `fungi feast`: pass --name to choose another name")


def _write_config(repo: Path, project: str, notes: list[str], offline_store: str) -> bool:
    """Write ``feature_store.yaml`` when missing (True); an existing one is checked, never rewritten."""
    path = repo / "feature_store.yaml"
    if path.exists():
        import yaml

        try:
            config = yaml.safe_load(path.read_text()) or {}
            store = (config.get("online_store") or {}) if isinstance(config, dict) else {}
            offline = (config.get("offline_store") or {}) if isinstance(config, dict) else {}
        except yaml.YAMLError:
            store = offline = {}
        if offline_store == DUCKDB_STORE and (not isinstance(offline, dict) or offline.get("type") != DUCKDB_STORE):
            raise ConfigError(
                f"{path}: a Delta or Iceberg output is served by Feast's {DUCKDB_STORE} offline store, and this "
                f"repository's is {offline.get('type') if isinstance(offline, dict) else offline}, for which "
                "the sources of its Parquet folder outputs are written: serve the table from a repository of its own "
                "(another --repo)"
            )
        if not isinstance(store, dict) or store.get("type") != STORE_TYPE or not store.get("vector_enabled"):
            notes.append(
                f"{path} is kept as it is; vector search with sqlite-vec needs its online_store to be "
                f"type: {STORE_TYPE} with vector_enabled: true"
            )
        return False
    path.write_text(
        "# Written by `fungi feast` (never rewritten: edit freely). The local provider; the offline store reads\n"
        "# the sources (`file`: Parquet folders; `duckdb`: also the data files of Delta and Iceberg tables); the\n"
        "# SQLite online store with sqlite-vec vector search (pipelines/feast_online.py).\n"
        f"project: {project}\n"
        "provider: local\n"
        "registry: data/registry.db\n"
        "offline_store:\n"
        f"  type: {offline_store}\n"
        "online_store:\n"
        f"  type: {STORE_TYPE}\n"
        "  path: data/online.db\n"
        "  vector_enabled: true\n"
        "entity_key_serialization_version: 3\n"
    )
    return True


def _install_duckdb_delta(notes: list[str]) -> None:
    """Make DuckDB's ``delta`` extension available offline, from the ``duckdb-extension-delta`` wheel.

    Feast's duckdb offline store reads Delta through ibis, which asks DuckDB to ``INSTALL
    delta`` (a download) unless the extension is installed already; installing it once from
    the wheel's file means no node needs the extension server.
    """
    import duckdb

    installed = duckdb.sql(
        "SELECT installed FROM duckdb_extensions() WHERE extension_name = 'delta'"
    ).fetchone()
    if installed and installed[0]:
        return
    try:
        import duckdb_extension_delta
    except ImportError:
        notes.append("DuckDB's delta extension is not installed: Feast's first read downloads it "
                     "(offline: pip install duckdb-extension-delta matching your duckdb version)")
        return
    folder = Path(duckdb_extension_delta.__file__).parent / "extensions" / f"v{duckdb.__version__}"
    files = sorted(folder.glob("delta.duckdb_extension"))
    if not files:
        notes.append(f"duckdb-extension-delta has no extension for duckdb {duckdb.__version__}: install the matching "
                     "version, or let Feast's first read download it")
        return
    duckdb.install_extension(str(files[0]))


def _view_tags(source: FeatureOutput, update: RepoUpdate) -> dict[str, str]:
    """The tags of the output's feature views: where they come from and the whole spec."""
    spec = source.spec
    return {
        "fungi.output": source.root,
        "fungi.source": update.source_kind,
        "fungi.spec_hash": source.spec_hash,
        "fungi.model": str(spec.get("model")),
        "fungi.modality": str(spec.get("modality")),
        "fungi.objectives": ",".join(o["name"] for o in spec.get("objectives", [])),
        "fungi.seed": str(spec.get("seed")),
        "fungi.embed_dim": str(source.dim("embedding")),
        "fungi.projection_dim": str(source.dim(source.vector_columns[1])) if len(source.vector_columns) > 1 else "",
        "fungi.spec": json.dumps(spec, sort_keys=True, separators=(",", ":")),
    }


def _definitions_source(source: FeatureOutput, update: RepoUpdate, kept: list[tuple[str, str]], mirror: Path) -> str:
    """The repository's ``fungi_<name>.py``: entity, source, feature views and service of the output."""
    spec = source.spec
    objectives = [o["name"] for o in spec.get("objectives", [])]
    header = {"output": source.root, "spec_hash": source.spec_hash, "views": update.views}
    tags = _view_tags(source, update)
    endpoint = source.endpoint()
    types = sorted({"Array", "Float32", "String", *(t.replace("Array(", "").rstrip(")") for _, t in kept)})
    name, view = update.name, update.feature_view
    lines = [
        f"# Generated by `fungi feast` from {source.root} (spec {source.spec_hash}).",
        "# Re-running `fungi feast` rewrites this file: keep your own definitions in other files.",
        HEADER_MARK + json.dumps(header, sort_keys=True),
        "from datetime import timedelta",
        "",
        "from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType",
        *(["from feast.data_format import DeltaFormat, ParquetFormat"] if source.kind != PARQUET else []),
        f"from feast.types import {', '.join(types)}",
        "",
        f"{name}_entity = Entity(",
        f"    name={name!r},",
        f"    join_keys=[{ID_COLUMN!r}],",
        "    value_type=ValueType.STRING,",
        f"    description={'rows of ' + source.root!r},",
        ")",
        "",
        f"{view}_source = FileSource(",
        f"    name={view + '_source'!r},",
        f"    path={source.source_path!r},",
        f"    timestamp_field={EVENT_TIME_COLUMN!r},",
    ]
    if source.kind != PARQUET:  # the duckdb store reads a Parquet source only when told so, and by a glob
        lines.append("    file_format=ParquetFormat()," if source.history else "    file_format=DeltaFormat(),")
    if endpoint:
        lines.append(f"    s3_endpoint_override={endpoint!r},")
    lines += [
        f"    description={_source_description(update.source_kind, table=source.kind != PARQUET)!r},",
        ")",
        "",
        f"{view} = FeatureView(",
        f"    name={view!r},",
        f"    entities=[{name}_entity],",
        "    ttl=timedelta(0),",
        f"    source={view}_source,",
        "    online=True,",
        "    schema=[",
        f"        Field(name={ID_COLUMN!r}, dtype=String),",
        _vector_field("embedding", source.dim("embedding"), True, "the model's embedding, L2-normalised"),
    ]
    for column, objective in zip(source.vector_columns[1:], objectives):
        description = f"FUNGI gradient of the {objective} objective, projected, L2-normalised"
        lines.append(_vector_field(column, source.dim(column), False, description))
    lines.append(f"        Field(name={CONTENT_HASH_COLUMN!r}, dtype=String, description='hash of the input payload'),")
    lines += [f"        Field(name={column!r}, dtype={feast_type})," for column, feast_type in kept]
    lines += [
        "    ],",
        f"    tags={_dict_source(tags)},",
        f"    description={'FUNGI features of ' + str(spec.get('model')) + ' (' + ', '.join(objectives) + ')'!r},",
        ")",
    ]
    if update.fungi_view:
        lines += _fungi_view_lines(source, update, tags, mirror)
    views = ", ".join(update.views)
    lines += [
        "",
        f"{name}_service = FeatureService(",
        f"    name={name!r},",
        f"    features=[{views}],",
        f"    description={'the features of ' + source.root + ' (its current spec: ' + ', '.join(update.views) + ')'!r},",
        f"    tags={{'fungi.spec_hash': {source.spec_hash!r}}},",
        ")",
    ]
    return "\n".join(lines) + "\n"


def _fungi_view_lines(source: FeatureOutput, update: RepoUpdate, tags: dict[str, str], mirror: Path) -> list[str]:
    """The ``<view>_fungi`` feature view over the FUNGI vectors ``fungi feast`` wrote under ``mirror``."""
    concat, name = update.fungi_view, update.name
    dim = sum(source.dim(c) for c in source.vector_columns)
    blocks = ",".join(source.vector_columns)
    return [
        "",
        f"{concat}_source = FileSource(",
        f"    name={concat + '_source'!r},",
        # the duckdb store (a table output's) reads a Parquet source only when told so, and by a glob
        *([f"    path={str(mirror / '*.parquet')!r},", "    file_format=ParquetFormat(),"] if source.kind != PARQUET
          else [f"    path={str(mirror)!r},"]),
        f"    timestamp_field={EVENT_TIME_COLUMN!r},",
        f"    description={f'the FUNGI concatenation of {blocks}, written by fungi feast from {source.source_path}'!r},",
        ")",
        "",
        f"{concat} = FeatureView(",
        f"    name={concat!r},",
        f"    entities=[{name}_entity],",
        "    ttl=timedelta(0),",
        f"    source={concat}_source,",
        "    online=True,",
        "    schema=[",
        f"        Field(name={ID_COLUMN!r}, dtype=String),",
        _vector_field(FUNGI_FEATURE, dim, True, f"{blocks}: each block L2-normalised, concatenated, L2-normalised"),
        "    ],",
        f"    tags={_dict_source({**tags, 'fungi.blocks': blocks})},",
        f"    description={'FUNGI concatenation (' + blocks + ') for vector search'!r},",
        ")",
    ]


def _dict_source(values: dict[str, str]) -> str:
    items = "".join(f"        {key!r}: {value!r},\n" for key, value in values.items())
    return "{\n" + items + "    }"


def _vector_field(name: str, dim: int, indexed: bool, description: str) -> str:
    index = f", vector_index=True, vector_length={dim}, vector_search_metric='COSINE'" if indexed else ""
    return f"        Field(name={name!r}, dtype=Array(Float32){index}, description={description + f' ({dim})'!r}),"


def _source_description(kind: str, table: bool) -> str:
    if kind == "history" and table:
        return "every row version the table keeps (its versions since the last vacuum): point-in-time correct"
    if kind == "history":
        return "every row version fungi featurize wrote (--history): point-in-time correct"
    return "the current rows (no --history): point-in-time correct only for rows never changed"


def describe(update: RepoUpdate) -> Iterable[str]:
    """The lines ``fungi feast`` prints."""
    verb = "wrote" if update.config_written else "kept"
    yield f"{verb} {update.repo / 'feature_store.yaml'}"
    yield (
        f"wrote {update.definitions}: entity {update.entity} (id), feature view {update.feature_view} "
        f"({', '.join(update.features)})" + (f", feature view {update.fungi_view} (fungi)" if update.fungi_view else "")
        + f", feature service {update.name}"
    )
    yield f"source: {update.source} ({'every row version' if update.source_kind == 'history' else 'current rows'})"
    if update.fungi_view:
        yield f"FUNGI vectors: {update.fungi_files_written} file(s) written, {update.fungi_files_kept} up to date"
    if update.removed_views:
        yield f"removed views: {', '.join(update.removed_views)} (`feast apply` deletes them)"
    if update.materialized:
        yield f"applied and materialized: {', '.join(update.views)}"
    if update.deleted_found or update.deleted_removed or update.deleted_pending:
        line = (f"deleted ids: {update.deleted_found} gone from the output since the last run, "
                f"{update.deleted_removed} removed from the online store")
        if update.deleted_pending:
            line += (f", {update.deleted_pending} to remove once every view is materialized "
                     "(`fungi feast --materialize` does it in one step)")
        yield line
    for note in update.notes:
        yield f"note: {note}"
    if not update.materialized:
        yield (
            f"next: feast -c {update.repo} apply && "
            f"feast -c {update.repo} materialize-incremental $(date -u +%Y-%m-%dT%H:%M:%S); or this command with "
            "--materialize, which also removes the ids the output deleted, after materializing"
        )

