"""A Delta Lake output (``delta:PATH``, local or S3): one run is one Delta version.

The run has staged everything it commits in ``_staging/<run_id>/final/`` (one data file
per touched source, named with the run id: data files are immutable in a table, time
travel reads the old ones; and one error file per source, under ``_errors/``). Then:

1. this version's fungi manifest (header and sources table) is written under
   ``_fungi_versions/<run_id>/`` (nothing refers to it yet);
2. the staged files are moved to their names under the table root (new names: no
   committed file is touched; Delta readers see only the files its log adds);
3. **one Delta commit** adds this run's data files (with row counts and min/max of ``id``)
   and removes the data files they supersede (the touched sources' previous files, the
   sources gone with ``--prune``; with ``--overwrite`` every file of the table), its commit
   info carrying the spec, spec hash, vector dimensions, run id, row counts and the
   manifest's folder (:func:`pipelines.formats.base.table_properties`): the commit point;
4. the staging area is deleted.

A kill before 3 leaves the previous version for every engine (Spark, Trino, Polars,
DuckDB, deltalake): the next run, under the lease, deletes what the dead run moved in (the
names its manifest lists) with its manifest folder and staging. A kill after 3 leaves the
new version; the next run deletes the staging area. Another writer committing between our
read and our commit makes Delta's conflict check fail ours (nothing of ours is then
referenced, and the files are deleted). A commit by another engine since fungi's last one
that changed the table's files (``OPTIMIZE``, a ``DELETE``) breaks the per-source lineage
fungi keeps: an incremental night is refused until ``--overwrite`` rebuilds it.

Fungi's own files (``_fungi_versions/``, ``_errors/``, ``_fungi_setup/``, ``_staging/``,
the lease) are in ``_``-folders: Delta's readers and ``VACUUM`` ignore them. Vectors are
``list<float>`` in the files (Delta has no fixed-size list; Polars refuses a file whose
type is not the table's); :meth:`DeltaOutput.read` gives them back fixed-size.
"""
from __future__ import annotations

import json
import logging
import posixpath
import time
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fungi_ops.errors import ConfigError
from pipelines.formats.base import (
    MANIFEST_PROPERTY, RUN_PROPERTY, SETUP_DIR, STAGING_DIR, Fault, OutputTable, T, manifest_dims, restore_vectors,
    table_properties,
)
from pipelines.formats.input_tables import delta_storage_options
from pipelines.manifest import ERRORS_DIR, Manifest, read_manifest, write_header, write_sources_table
from pipelines.stages import staged_final_path
from pipelines.storage import Location, delete_file, delete_tree, exists, list_files, read_bytes

log = logging.getLogger(__name__)
VERSIONS_DIR = "_fungi_versions"  # one folder per committed run: that version's fungi manifest
HISTORY_SCAN = 100  # commits looked at to find fungi's latest (another engine's commits may follow it)


class DeltaOutput(OutputTable):
    """A Delta table written by fungi: fungi's lineage in its own files, the table's state in the Delta log."""

    kind = "delta"
    versioned_names = True
    list_vectors = True

    def __init__(self, target: str, storage_options: dict[str, Any], fault: Fault | None = None) -> None:
        super().__init__(fault)
        self.location = Location(target, storage_options)
        self.fs = self.location.filesystem()
        self.table_uri = f"s3://{self.location.path}" if self.location.is_s3 else self.location.path
        self.delta_options = delta_storage_options(self.location)
        if self.location.is_s3:
            self.delta_options.setdefault("conditional_put", "etag")  # commits by If-None-Match: no lock service

    @property
    def root(self) -> Location:
        """The table's folder."""
        return self.location

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

    def _fungi_commit(self, table: Any) -> dict[str, Any] | None:
        """The commit info of fungi's latest commit in the table (looked for in its last commits)."""
        if table is None:
            return None
        return next((c for c in self._commits(table, HISTORY_SCAN) if RUN_PROPERTY in c), None)

    def _table_files(self, table: Any) -> set[str]:
        """Paths (relative to the root) of the data files of a table version."""
        paths = pa.table(table.get_add_actions(flatten=True)).column("path").to_pylist()
        return {self._relative(p) for p in paths}

    def _relative(self, path: str) -> str:
        if "://" in path:
            path = path.split("://", 1)[1]
        root = self.location.path.rstrip("/") + "/"
        return path[len(root):] if path.startswith(root) else path.lstrip("/")

    # -- state --------------------------------------------------------------------------------
    def read_manifest(self) -> Manifest | None:
        """The fungi manifest that fungi's latest commit of the table names (None: no fungi commit)."""
        commit = self._fungi_commit(self._table())
        if commit is None:
            return None
        return read_manifest(self.location.join(commit[MANIFEST_PROPERTY]))

    def holds_foreign_data(self) -> bool:
        """A Delta table that fungi never committed to, or a folder of Parquet files that is not a table."""
        table = self._table()
        if table is None:
            return bool(list_files(self.fs, self.location.path, ".parquet"))
        return self._fungi_commit(table) is None and bool(self._table_files(table))

    def recover(self, run_id: str, *, tolerate_unreadable: bool = False) -> Manifest | None:
        """Undo what dead runs left (their moved-in files, manifests, staging), then check the lineage."""
        table = self._table()
        commit = self._fungi_commit(table)
        committed_run = commit[RUN_PROPERTY] if commit else None
        staging_root = self.location.child_path(STAGING_DIR)
        if exists(self.fs, staging_root):
            for info in self.fs.get_file_info(pafs.FileSelector(staging_root)):
                dead = posixpath.basename(info.path)
                if dead == run_id:
                    continue
                if dead != committed_run:
                    self._forget(dead)
                delete_tree(self.fs, info.path)
        manifest = read_manifest(self.location.join(commit[MANIFEST_PROPERTY])) if commit else None
        if manifest is not None and not tolerate_unreadable:
            self._refuse_drift(table, manifest)
        return manifest

    def _refuse_drift(self, table: Any, manifest: Manifest) -> None:
        """ConfigError when the table's files are not those fungi's manifest names (another engine rewrote them)."""
        drifted = self._table_files(table) ^ set(manifest.data_files())
        if drifted:
            raise ConfigError(
                f"{self.uri} was changed by another writer since fungi's last commit (now at version {table.version()}; "
                f"{len(drifted)} data file(s) differ, e.g. {sorted(drifted)[0]}: an OPTIMIZE, DELETE or write by "
                "another engine): fungi's per-source lineage no longer matches the table; rebuild with --overwrite"
            )

    def _forget(self, run_id: str) -> None:
        """Delete the files a run that never committed moved in, and its manifest folder."""
        folder = self.location.join(VERSIONS_DIR, run_id)
        if exists(self.fs, folder.child_path("_fungi_manifest.json")):
            mine = read_manifest(folder)
            rows = mine.sources.to_pylist()
            for name in (n for row in rows if row["run_id"] == run_id for n in (row["file"], row["error_file"]) if n):
                delete_file(self.fs, self.location.child_path(name))
        log.warning("deleting what run %s left: it died before its commit", run_id)
        delete_tree(self.fs, folder.path)

    # -- commit -------------------------------------------------------------------------------
    def commit(self, new: Manifest, previous: Manifest | None, run_id: str, *, overwrite: bool) -> None:
        """Make ``new`` the table's state in one Delta version (see the module docstring)."""
        from deltalake.exceptions import CommitFailedError

        table = self._table()
        if table is not None and previous is not None and not overwrite:
            self._refuse_drift(table, previous)
        new.version = (previous.version if previous else 0) + 1
        new.pending = None
        folder = self.location.join(VERSIONS_DIR, run_id)
        write_sources_table(folder, new)
        write_header(folder, new)
        self.step(f"write the manifest of {run_id}")
        staging = self.staging_area(run_id)
        added = []
        for row in (r for r in new.sources.to_pylist() if r["run_id"] == run_id):
            for name in (row["file"], row["error_file"]):
                staged = staged_final_path(staging, name) if name else None
                if staged and exists(self.fs, staged):
                    self.fs.create_dir(posixpath.dirname(self.location.child_path(name)), recursive=True)
                    self.fs.move(staged, self.location.child_path(name))
                    self.step(f"move {name}")
            if row["file"]:
                added.append(row["file"])
        current = self._table_files(table) if table is not None else set()
        keep = set(new.data_files())
        removed = sorted(current - keep) if overwrite else sorted(set(previous.data_files() if previous else ()) - keep)
        schema = self._schema(added, table)
        properties = {**table_properties(new, run_id), MANIFEST_PROPERTY: f"{VERSIONS_DIR}/{run_id}"}
        try:
            self._write_version(table, schema, [self._add(name) for name in added if name not in current],
                                removed, properties)
        except CommitFailedError as exc:
            self._forget(run_id)
            raise ConfigError(
                f"{self.uri} changed since this run read it (another writer committed): nothing was committed; "
                f"run again ({exc})"
            ) from None
        self.step(f"Delta commit of {run_id} (commit point)")
        delete_tree(self.fs, staging.path)
        self.step("delete the staging area")

    def _schema(self, added: list[str], table: Any) -> pa.Schema:
        """The table's Arrow schema: the current one, else the first new data file's (list vectors)."""
        if table is not None:
            return pa.schema(table.schema().to_arrow())
        if not added:
            raise ConfigError(f"{self.uri}: the first run wrote no feature rows; nothing to make a table of")
        with self.fs.open_input_file(self.location.child_path(added[0])) as handle:
            return pq.read_schema(handle).remove_metadata()

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

    def _write_version(self, table: Any, schema: pa.Schema, adds: list[Any], removed: list[str],
                       properties: dict[str, Any]) -> None:
        """One Delta version: the table's creation with its files, or one transaction of adds and removes."""
        from deltalake import Schema
        from deltalake.transaction import CommitProperties, RemoveAction, create_table_with_add_actions

        commit_properties = CommitProperties(custom_metadata={k: str(v) for k, v in properties.items()})
        if table is None:
            create_table_with_add_actions(self.table_uri, Schema.from_arrow(schema), adds, mode="error",
                                          storage_options=self.delta_options, commit_properties=commit_properties)
            return
        now = int(time.time() * 1000)
        actions = [*adds, *(RemoveAction(name, True, now) for name in removed)]
        table.create_write_transaction(actions, mode="append", schema=table.schema(), commit_properties=commit_properties)

    # -- readers ------------------------------------------------------------------------------
    def read_files(self, read: Callable[[list[str] | None], T], version: int | None = None) -> T:
        """``read(paths)`` over the data files of the current version or ``version`` (immutable files)."""
        table = self._table(version)
        if table is None:
            raise ConfigError(f"{self.uri} is not a Delta table (no _delta_log/)")
        return read(sorted(self.location.child_path(name) for name in self._table_files(table)))

    def read(self, columns: list[str] | None = None, version: int | None = None) -> pa.Table:
        """One version as Delta readers see it, vectors fixed-size (their dimensions from the spec)."""
        table = self._table(version)
        if table is None:
            raise ConfigError(f"{self.uri} is not a Delta table (no _delta_log/)")
        manifest = self.read_manifest()
        rows = table.to_pyarrow_table(columns=columns)
        return restore_vectors(rows, manifest_dims(manifest.spec)) if manifest else rows

    # -- maintenance --------------------------------------------------------------------------
    def vacuum(self, retention_hours: float) -> dict[str, int]:
        """Delta's VACUUM of files removed before the retention, then fungi's files no kept version names.

        Kept: the manifest folders and error files of fungi's commits within the retention
        and of its latest commit; the setup state of the current spec.
        """
        table = self._table()
        if table is None:
            raise ConfigError(f"{self.uri} is not a Delta table (no _delta_log/)")
        deleted = table.vacuum(retention_hours=int(retention_hours), dry_run=False, enforce_retention_duration=False)
        cutoff = (time.time() - retention_hours * 3600) * 1000
        commits = [c for c in self._commits(table) if RUN_PROPERTY in c]  # newest first
        kept = {c[MANIFEST_PROPERTY] for c in commits if c["timestamp"] >= cutoff} | {commits[0][MANIFEST_PROPERTY]}
        errors_kept: set[str] = set()
        setup_kept: set[str] = set()
        for folder in kept:
            manifest = read_manifest(self.location.join(folder))
            errors_kept |= set(manifest.error_files())
            if manifest.setup_artifact:
                setup_kept.add(manifest.setup_artifact)
        counts = {"data files": len(deleted), "manifests": 0, "error files": 0, "setup states": 0}
        for info in self.fs.get_file_info(pafs.FileSelector(self.location.child_path(VERSIONS_DIR))):
            if f"{VERSIONS_DIR}/{posixpath.basename(info.path)}" not in kept:
                delete_tree(self.fs, info.path)
                counts["manifests"] += 1
        for folder, keep, what in ((ERRORS_DIR, errors_kept, "error files"), (SETUP_DIR, setup_kept, "setup states")):
            for info in list_files(self.fs, self.location.child_path(folder)):
                if self._relative(info.path) not in keep:
                    delete_file(self.fs, info.path)
                    counts[what] += 1
        return counts
