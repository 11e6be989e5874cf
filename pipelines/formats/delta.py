"""A Delta Lake output (``delta:PATH``, local or S3): one run is one Delta version.

The commit path is :class:`~pipelines.formats.table.LakeTable`'s; here are Delta's parts. The
commit point is one Delta transaction: the add actions of this run's data files (with row
counts and min/max of ``id``, for file skipping) and the remove actions of the files they
supersede, its commit info carrying fungi's properties. On S3 the commit is a conditional put
(no lock service). Fungi reads its commit infos from the log's own files
(``_delta_log/<version>.json``) rather than through ``DeltaTable.history``, whose listing of
the log never returns on some S3 stores (moto's). Each fungi commit also carries a Delta
application transaction (``txn``, app id ``fungi``) whose version is the Delta version of that
commit: the table's state keeps it (checkpoints included) whatever other writers commit after
it, so fungi finds its latest commit in one read, not by walking the history back. An
``--overwrite`` replaces the table's schema in its commit (a kept column added, a dropped one
gone). Vectors are ``list<float>``: Polars refuses a file whose type is not the table's.
"""
from __future__ import annotations

import json
import math
import time
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from fungi_ops.errors import ConfigError
from pipelines.formats.base import Fault
from pipelines.layout import RUN_PROPERTY
from pipelines.formats.sources import delta_storage_options
from pipelines.formats.table import CommitConflict, LakeTable
from pipelines.storage import Location, read_bytes


APP_ID = "fungi"  # the Delta application transaction whose version is fungi's latest commit


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

    def _commits(self, table: Any) -> Iterator[dict[str, Any]]:
        """Commit infos from ``table``'s version back (newest first), ending where the log was cleaned up."""
        for version in range(table.version(), -1, -1):
            commit = self._commit_info(version)
            if commit is None:
                return
            yield commit

    def _fungi_commit(self, table: Any) -> dict[str, Any] | None:
        """Fungi's latest commit up to ``table``'s version: the one its ``fungi`` transaction names (one log
        read, however many commits other writers made since); the history walked back for a table whose
        fungi commits predate that transaction."""
        if table is None:
            return None
        version = table.transaction_version(APP_ID)
        commit = self._commit_info(version) if version is not None and version <= table.version() else None
        if commit is not None and RUN_PROPERTY in commit:
            return commit
        return super()._fungi_commit(table)

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
        """One Delta version: the table's creation with its files, or one transaction of adds and removes.

        An ``--overwrite`` that keeps none of the current files is a Delta overwrite (every current file
        removed) with the new files' schema: the table's columns become theirs in the same commit.
        """
        from deltalake import Schema
        from deltalake.exceptions import CommitFailedError
        from deltalake.transaction import CommitProperties, RemoveAction, Transaction, create_table_with_add_actions

        version = 0 if table is None else table.version() + 1  # a concurrent commit of that version fails ours
        commit_properties = CommitProperties(custom_metadata=properties,
                                             app_transactions=[Transaction(app_id=APP_ID, version=version)])
        adds = [self._add(name) for name in added]
        try:
            if table is None:
                create_table_with_add_actions(self.table_uri, Schema.from_arrow(self._file_schema(added[0])), adds, mode="error",
                                              storage_options=self.delta_options, commit_properties=commit_properties)
                return
            if overwrite and added and set(removed) == self._table_files(table):
                schema = Schema.from_arrow(self._file_schema(added[0]))
                table.create_write_transaction(adds, mode="overwrite", schema=schema, commit_properties=commit_properties)
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
        """Delta's full VACUUM: the files removed from the log before the retention, and the files the log never
        named (a dead run's) older than it.

        Delta counts the retention in whole hours: a fractional one is rounded up (a file is kept a little
        longer, never less long), so every version inside the retention stays readable.
        """
        hours = math.ceil(retention_hours)
        return len(table.vacuum(retention_hours=hours, dry_run=False, enforce_retention_duration=False, full=True))
