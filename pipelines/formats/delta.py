"""A Delta Lake output (``delta:PATH``, local or S3): one run is one Delta version.

The commit path is :class:`~pipelines.formats.table.LakeTable`'s; here are Delta's parts. The
commit point is one Delta transaction: the add actions of this run's data files (with row
counts and min/max of ``id``, for file skipping) and the remove actions of the files they
supersede, its commit info carrying fungi's properties. On S3 the commit is a conditional put
(no lock service). Fungi reads its commit infos from the log's own files
(``_delta_log/<version>.json``) rather than through ``DeltaTable.history``, whose listing of
the log never returns on some S3 stores (moto's). Vectors are ``list<float>``: Polars refuses
a file whose type is not the table's.
"""
from __future__ import annotations

import json
import time
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from fungi_ops.errors import ConfigError
from pipelines.formats.base import Fault
from pipelines.formats.input_tables import delta_storage_options
from pipelines.formats.table import CommitConflict, LakeTable
from pipelines.storage import Location, read_bytes


class DeltaOutput(LakeTable):
    """A Delta table written by fungi: fungi's lineage in its own files, the table's state in the Delta log."""

    kind = "delta"

    def __init__(self, target: str, storage_options: dict[str, Any], fault: Fault | None = None) -> None:
        super().__init__(Location(target, storage_options), fault)
        self.table_uri = f"s3://{self.location.path}" if self.location.is_s3 else self.location.path
        self.delta_options = delta_storage_options(self.location)
        if self.location.is_s3:
            self.delta_options.setdefault("conditional_put", "etag")  # commits by If-None-Match: no lock service

    @property
    def uri(self) -> str:
        """``delta:PATH``."""
        return f"delta:{self.location.uri}"

    # -- the Delta log ----------------------------------------------------------------------
    def _table(self, version: int | None = None) -> Any:
        """The ``DeltaTable`` (at ``version``), or None when there is no table yet."""
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        try:
            return DeltaTable(self.table_uri, version=version, storage_options=self.delta_options)
        except TableNotFoundError:
            if version is not None and DeltaTable.is_deltatable(self.table_uri, self.delta_options):
                raise ConfigError(f"{self.uri} has no version {version}") from None
            return None
        except Exception as exc:  # deltalake raises a generic error for a version that is gone
            if version is not None:
                raise ConfigError(f"{self.uri}: version {version} cannot be read ({exc})") from None
            raise

    def _commit_info(self, version: int) -> dict[str, Any] | None:
        """The commit info of one version (its ``version`` added); None when its log entry is gone.

        Read from the version's own log file (one small object) rather than through
        ``DeltaTable.history``, whose listing of the log never returns on some S3 stores (moto's).
        """
        path = self.location.child_path("_delta_log", f"{version:020d}.json")
        try:
            lines = read_bytes(self.fs, path).decode().splitlines()
        except FileNotFoundError:
            return None
        for line in filter(str.strip, lines):
            action = json.loads(line)
            if "commitInfo" in action:
                return {**action["commitInfo"], "version": version}
        return {"version": version}

    def _commits(self, table: Any, limit: int | None = None) -> Iterator[dict[str, Any]]:
        """Commit infos from ``table``'s version back (newest first), ending where the log was cleaned up."""
        oldest = 0 if limit is None else max(0, table.version() - limit + 1)
        for version in range(table.version(), oldest - 1, -1):
            commit = self._commit_info(version)
            if commit is None:
                return
            yield commit

    def _table_files(self, table: Any) -> set[str]:
        """Paths (relative to the root) of the data files of a table version."""
        paths = pa.table(table.get_add_actions(flatten=True)).column("path").to_pylist()
        return {self._relative(p) for p in paths}

    def _version_of(self, table: Any) -> int:
        return table.version()

    def _add(self, name: str) -> Any:
        """The add action of one of our data files: size, time, row count, min/max of ``id`` (file skipping)."""
        from deltalake.transaction import AddAction

        path = self.location.child_path(name)
        info = self.fs.get_file_info(path)
        with self.fs.open_input_file(path) as handle:
            metadata = pq.ParquetFile(handle).metadata
        stats: dict[str, Any] = {"numRecords": metadata.num_rows}
        column = metadata.schema.to_arrow_schema().get_field_index("id")
        groups = [metadata.row_group(g).column(column).statistics for g in range(metadata.num_row_groups)]
        if column >= 0 and groups and all(s is not None and s.has_min_max for s in groups):
            stats["minValues"] = {"id": min(s.min for s in groups)}
            stats["maxValues"] = {"id": max(s.max for s in groups)}
            stats["nullCount"] = {"id": sum(s.null_count for s in groups)}
        modified = int(info.mtime.timestamp() * 1000) if info.mtime else int(time.time() * 1000)
        return AddAction(name, info.size, {}, modified, True, json.dumps(stats))

    def _write_version(self, table: Any, added: list[str], removed: list[str], properties: dict[str, str], *,
                       overwrite: bool) -> None:
        """One Delta version: the table's creation with its files, or one transaction of adds and removes."""
        from deltalake import Schema
        from deltalake.exceptions import CommitFailedError
        from deltalake.transaction import CommitProperties, RemoveAction, create_table_with_add_actions

        commit_properties = CommitProperties(custom_metadata=properties)
        adds = [self._add(name) for name in added]
        try:
            if table is None:
                create_table_with_add_actions(self.table_uri, Schema.from_arrow(self._file_schema(added[0])), adds, mode="error",
                                              storage_options=self.delta_options, commit_properties=commit_properties)
                return
            now = int(time.time() * 1000)
            actions = [*adds, *(RemoveAction(name, True, now) for name in removed)]
            table.create_write_transaction(actions, mode="append", schema=table.schema(),
                                           commit_properties=commit_properties)
        except CommitFailedError as exc:
            raise CommitConflict(str(exc)) from None

    # -- readers and maintenance ----------------------------------------------------------------
    def _read_rows(self, table: Any, columns: list[str] | None) -> pa.Table:
        return table.to_pyarrow_table(columns=columns)

    def _vacuum_table(self, table: Any, retention_hours: float) -> int:
        """Delta's VACUUM of the files removed from the log before the retention."""
        return len(table.vacuum(retention_hours=int(retention_hours), dry_run=False, enforce_retention_duration=False))
