"""A FUNGI feature output as Feast reads it: its committed manifest, spec, schema and data files.

:func:`open_feature_output` opens a committed output of any format (a Parquet folder, a Delta or
an Iceberg table) as a :class:`FeatureOutput`: the files a Feast source reads (every row version
the output keeps, or its current rows) and the checks that the columns can be Feast features.
Nothing is loaded: the rows stay where the job wrote them.
"""
from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fungi_ops.errors import ConfigError
from pipelines.formats import open_output
from pipelines.formats.address import ICEBERG, PARQUET, TableAddress, parse_address
from pipelines.formats.base import manifest_dims, restore_vectors
from pipelines.formats.folder import history_path
from pipelines.layout import CONTENT_HASH_COLUMN, EVENT_TIME_COLUMN, ID_COLUMN, MANIFEST_NAME, SPEC_HASH_KEY
from pipelines.manifest import Manifest
from pipelines.storage import Location, exists

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


def open_feature_output(uri: str, storage_options: dict[str, Any] | None = None, *, current_version: bool = False,
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
        table = open_output(uri, options, catalog=catalog)
        location = table.location
    else:
        location = Location(address.target, options)
        info = location.filesystem().get_file_info(location.path)
        if info.type == pafs.FileType.NotFound:
            raise ConfigError(f"output {uri} does not exist")
        if info.type != pafs.FileType.Directory:
            raise ConfigError(f"output {uri} is not a directory: pass the folder that `fungi featurize --output` wrote")
        table = open_output(uri, options)
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
    found = (schema.metadata or {}).get(SPEC_HASH_KEY, b"").decode()
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
