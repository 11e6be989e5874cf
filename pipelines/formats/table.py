"""What a Delta and an Iceberg output share: fungi's lineage beside a table format's own commit.

A table's data files are immutable, so a run's files carry its run id (time travel reads the
old ones). The run has staged everything it commits in ``_staging/<run_id>/final/`` (one data
file per touched source and one error file per source, under ``_errors/``). Then
(:meth:`LakeTable.commit`):

1. this version's fungi manifest (header and sources table) is written under
   ``_fungi_versions/<run_id>/`` (nothing refers to it yet);
2. the staged files are moved to their names under the table root (new names: no committed
   file is touched; the table's readers see only the files its log / snapshot lists);
3. **one commit of the format** (:meth:`LakeTable._write_version`: a Delta version, an
   Iceberg snapshot) adds this run's data files and removes the files they supersede (the
   touched sources' previous files, the sources gone with ``--prune``; with ``--overwrite``
   every file of the table), carrying the spec, spec hash, vector dimensions, run id, row
   counts and the manifest's folder (:func:`pipelines.formats.base.table_properties`): the
   commit point;
4. the staging area is deleted.

A kill before 3 leaves the previous version for every engine; the next run, under the
lease (:meth:`LakeTable.recover`), deletes what the dead run moved in (the names its
manifest lists) with its manifest folder and staging. A kill after 3 leaves the new version;
the next run deletes the staging area. Another writer committing between our read and our
commit fails ours (:class:`CommitConflict`: nothing of ours is referenced, and our files are
deleted). A commit by another engine since fungi's last one that changed the table's files
(compaction, a ``DELETE``) breaks the per-source lineage: a night is refused until
``--overwrite`` rebuilds it.

Fungi's own files (``_fungi_versions/``, ``_errors/``, ``_fungi_setup/``, ``_staging/``, the
lease) are in ``_``-folders that the formats' readers never list. Vectors are
``list<float>`` in the files (neither format has a fixed-size list); :meth:`LakeTable.read`
gives them back fixed-size, with the dimensions the version's own commit records.
"""
from __future__ import annotations

import json
import logging
import posixpath
import time
from abc import abstractmethod
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fungi_ops.errors import ConfigError
from pipelines.formats.base import Fault, NothingToCommit, OutputTable, T, restore_vectors, table_properties
from pipelines.layout import (
    DIMS_PROPERTY, ERRORS_DIR, INTERNAL_SUFFIX, MANIFEST_PROPERTY, RUN_PROPERTY, SETUP_DIR, SPEC_HASH_PROPERTY, STAGING_DIR,
    VERSIONS_DIR, run_of_data_file, staged_final_path,
)
from pipelines.manifest import Manifest, read_manifest, write_header, write_sources_table
from pipelines.storage import Location, delete_file, delete_tree, exists, list_files, write_atomic

log = logging.getLogger(__name__)
COMMITTING_MARKER = "committing"  # in a run's staging area from its commit's start: an emptied folder vanishes on S3


class CommitConflict(Exception):
    """The format refused our commit: another writer committed since this run read the table."""


class LakeTable(OutputTable):
    """A table format's output (see the module docstring); subclasses implement the format's hooks.

    A *handle* is the format's view of one version (a ``DeltaTable``, an Iceberg table and
    snapshot); None when there is no table yet. A *commit* is a dict of what fungi recorded in
    one version (``fungi.run_id``, ``fungi.manifest``, ...) with its ``timestamp`` in ms.
    """

    versioned_names = True
    list_vectors = True
    version_word = "version"  # what the format calls a committed state, for messages

    def __init__(self, location: Location, fault: Fault | None = None) -> None:
        super().__init__(fault)
        self.location = location
        self.fs = location.filesystem()

    @property
    def root(self) -> Location:
        """The table's folder."""
        return self.location

    @property
    def data_folder(self) -> str:
        """The path of the folder that holds the table's data files (:attr:`data_dir` under the root)."""
        return self.location.child_path(self.data_dir.rstrip("/")) if self.data_dir else self.location.path

    # -- the format's hooks -----------------------------------------------------------------
    @abstractmethod
    def _table(self, version: int | None = None) -> Any:
        """The handle of the current version (or ``version``; ConfigError when it does not exist); None: no table."""

    @abstractmethod
    def _commits(self, table: Any) -> Iterator[dict[str, Any]]:
        """The commits from ``table``'s version back (newest first), ending where history ends."""

    @abstractmethod
    def _table_files(self, table: Any) -> set[str]:
        """Paths (relative to the root) of the files (data and delete files) of one version."""

    @abstractmethod
    def _version_of(self, table: Any) -> int:
        """The version number / snapshot id of a handle, for messages."""

    @abstractmethod
    def _write_version(self, table: Any, added: list[str], removed: list[str], properties: dict[str, str], *,
                       overwrite: bool) -> None:
        """One commit of the format: adds ``added`` and removes ``removed`` (names relative to the root), with
        ``properties``; the table's creation when ``table`` is None. :class:`CommitConflict` when refused."""

    @abstractmethod
    def _read_rows(self, table: Any, columns: list[str] | None) -> pa.Table:
        """One version's rows, as the format's own reader gives them."""

    @abstractmethod
    def _vacuum_table(self, table: Any, retention_hours: float) -> int:
        """Forget versions older than the retention (the current one kept), delete the data files only they
        read and those no version reads that are older than the retention; the number of data files deleted."""

    # -- state --------------------------------------------------------------------------------
    def _fungi_commit(self, table: Any) -> dict[str, Any] | None:
        """What fungi's latest commit up to ``table``'s version recorded, however many commits of other writers
        follow it (the history walked back; a format with a pointer to it overrides this)."""
        if table is None:
            return None
        return next((c for c in self._commits(table) if RUN_PROPERTY in c), None)

    def _relative(self, path: str) -> str:
        """A data file's path or URI, relative to the root."""
        if path.startswith("file:"):
            path = path[len("file:"):].lstrip("/")
        elif "://" in path:
            path = path.split("://", 1)[1]
        root = self.location.path.strip("/") + "/"
        path = path.lstrip("/")
        return path[len(root):] if path.startswith(root) else path

    def latest_version(self) -> int | None:
        """The current version's number (a Delta version, an Iceberg snapshot id; None: no table yet).

        Any writer's commit changes it, and it is read from the format's log or metadata alone
        (neither the rows nor fungi's manifest): what a reader that follows new versions polls.
        """
        table = self._table()
        return None if table is None else self._version_of(table)

    def committed_version(self, version: int | None = None) -> tuple[int, Manifest]:
        """``(version number, fungi manifest)`` of the current version or of ``version``: one committed state,
        which a reader pins (:meth:`read_files` with that number) to read its files and its manifest together."""
        table = self._existing(version)
        manifest = self._manifest_of(self._fungi_commit(table))
        if manifest is None:
            raise ConfigError(f"{self.uri} is not a fungi output (no commit of fungi's in its history)")
        return self._version_of(table), manifest

    def read_manifest(self) -> Manifest | None:
        """The fungi manifest that fungi's latest commit of the table names (None: no fungi commit)."""
        return self._manifest_of(self._fungi_commit(self._table()))

    def _manifest_of(self, commit: dict[str, Any] | None) -> Manifest | None:
        """The fungi manifest a fungi commit's properties name (None: no commit)."""
        return read_manifest(self.location.join(commit[MANIFEST_PROPERTY])) if commit else None

    def holds_foreign_data(self) -> bool:
        """A table that fungi never committed to, or a folder of Parquet files that is not a table."""
        table = self._table()
        if table is None:
            return bool(list_files(self.fs, self.location.path, ".parquet"))
        return self._fungi_commit(table) is None and bool(self._table_files(table))

    def recover(self, run_id: str, *, tolerate_unreadable: bool = False) -> Manifest | None:
        """Undo what dead runs left (their moved-in files, manifests, staging), then check the lineage."""
        table = self._table()
        commit = self._fungi_commit(table)
        self._clear_dead_runs(table, commit[RUN_PROPERTY] if commit else None, live_run=run_id)
        manifest = self._manifest_of(commit)
        if manifest is not None and not tolerate_unreadable:
            self._refuse_drift(table, manifest)
        return manifest

    def _clear_dead_runs(self, table: Any, committed_run: str | None, live_run: str | None = None) -> None:
        """Under the lease: forget every run with a staging area but ``live_run`` (a run that died before its
        commit point; ``committed_run`` died after it, and only its staging is deleted)."""
        staging_root = self.location.child_path(STAGING_DIR)
        if not exists(self.fs, staging_root):
            return
        areas = {posixpath.basename(info.path): info.path
                 for info in self.fs.get_file_info(pafs.FileSelector(staging_root))}
        areas.pop(live_run, None)
        self._forget(set(areas) - {committed_run}, table)
        for path in areas.values():
            delete_tree(self.fs, path)

    def _refuse_drift(self, table: Any, manifest: Manifest) -> None:
        """ConfigError when the table's files are not those fungi's manifest names (another engine rewrote them)."""
        drifted = self._table_files(table) ^ set(manifest.data_files())
        if drifted:
            raise ConfigError(
                f"{self.uri} was changed by another writer since fungi's last commit (now at {self.version_word} "
                f"{self._version_of(table)}; {len(drifted)} file(s) differ, e.g. {sorted(drifted)[0]}: a compaction, "
                "DELETE or write by another engine): fungi's per-source lineage no longer matches the table; "
                "rebuild with --overwrite"
            )

    def _forget(self, runs: set[str], table: Any) -> None:
        """Delete the files that runs which never committed moved in, and their manifest folders.

        Their files are found by the run id in their names (:func:`run_of_data_file`: the data
        folder and ``_errors/`` are listed once), so none is missed whatever deleted a run's
        manifest (a vacuum, a kill before it was whole); a file ``table``'s version reads is never
        deleted.
        """
        if not runs:
            return
        log.warning("deleting what run(s) %s left: they died before their commit", ", ".join(sorted(runs)))
        referenced = self._table_files(table) if table is not None else set()
        for folder in {self.data_folder, self.location.child_path(ERRORS_DIR)}:
            for info in list_files(self.fs, folder):
                run = run_of_data_file(info.base_name.removesuffix(INTERNAL_SUFFIX))
                if run in runs and self._relative(info.path) not in referenced:
                    delete_file(self.fs, info.path)
        for run in runs:
            delete_tree(self.fs, self.location.child_path(VERSIONS_DIR, run))

    # -- commit -------------------------------------------------------------------------------
    def commit(self, new: Manifest, previous: Manifest | None, run_id: str, *, overwrite: bool) -> None:
        """Make ``new`` the table's state in one commit of the format (see the module docstring)."""
        table = self._table()
        if table is None and not new.data_files():  # checked before anything is written: nothing to undo
            raise NothingToCommit(f"{self.uri}: no row was featurized ({new.errors} failed) and a new table needs one "
                                  "feature row: nothing was committed")
        if table is not None and previous is not None and not overwrite:
            self._refuse_drift(table, previous)
        new.version = (previous.version if previous else 0) + 1
        new.pending = None
        write_atomic(self.fs, self.staging_area(run_id).child_path(COMMITTING_MARKER), b"")  # findable until deleted
        folder = self.location.join(VERSIONS_DIR, run_id)
        write_sources_table(folder, new)
        write_header(folder, new)
        self.step(f"write the manifest of {run_id}")
        added = self._move_in(new, run_id)
        current = self._table_files(table) if table is not None else set()
        keep = set(new.data_files())
        removed = sorted(current - keep) if overwrite else sorted(set(previous.data_files() if previous else ()) - keep)
        properties = {**table_properties(new, run_id), MANIFEST_PROPERTY: f"{VERSIONS_DIR}/{run_id}"}
        try:
            self._write_version(table, [name for name in added if name not in current], removed,
                                {k: str(v) for k, v in properties.items()}, overwrite=overwrite)
        except CommitConflict as exc:
            self._forget({run_id}, self._table())
            raise ConfigError(
                f"{self.uri} changed since this run read it (another writer committed): nothing was committed; "
                f"run again ({exc})"
            ) from None
        self.step(f"{self.kind} commit of {run_id} (commit point)")
        delete_tree(self.fs, self.staging_area(run_id).path)
        self.step("delete the staging area")

    def _file_schema(self, name: str) -> pa.Schema:
        """The Arrow schema of one of our data files (list vectors): a new table's columns."""
        with self.fs.open_input_file(self.location.child_path(name)) as handle:
            return pq.read_schema(handle).remove_metadata()

    def _move_in(self, new: Manifest, run_id: str) -> list[str]:
        """Move this run's staged files to their names under the root; the data files' names."""
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
        return added

    # -- readers ------------------------------------------------------------------------------
    def _existing(self, version: int | None) -> Any:
        table = self._table(version)
        if table is None:
            raise ConfigError(f"{self.uri} is not a {self.kind} table yet")
        return table

    def read_files(self, read: Callable[[list[str] | None], T], version: int | None = None) -> T:
        """``read(paths)`` over the data files of the current version or ``version`` (immutable files)."""
        return read(sorted(self.location.child_path(name) for name in self._table_files(self._existing(version))))

    def read(self, columns: list[str] | None = None, version: int | None = None) -> pa.Table:
        """One version as the format's readers see it, vectors fixed-size (the dimensions that version recorded)."""
        table = self._existing(version)
        rows = self._read_rows(table, columns)
        commit = self._fungi_commit(table)
        return restore_vectors(rows, json.loads(commit[DIMS_PROPERTY])) if commit and DIMS_PROPERTY in commit else rows

    def row_version_files(self) -> list[pafs.FileInfo]:
        """The data files of every kept version of the current spec: every row version still on disk.

        A table's data files are immutable and named by their run (``...-<run_id>.parquet``
        under :attr:`data_dir`): a night's rewritten source gets a new file and the old one
        stays, for time travel, until ``fungi vacuum``. Read together (the glob
        ``<root>/<data_dir>*.parquet``) they hold each row as every version wrote it, with its
        ``event_time``: what Feast's point-in-time joins need. A row carried unchanged into a
        new file repeats with the same ``event_time`` and values.

        :class:`ConfigError` names the first file that glob would read wrongly: one of
        another spec (kept after an ``--overwrite`` until vacuum), or one no kept commit of
        fungi's added (a killed run's, which the next ``fungi featurize`` or ``fungi vacuum``
        deletes; another engine's).
        """
        table = self._existing(None)
        latest = self._fungi_commit(table)
        if latest is None:
            raise ConfigError(f"{self.uri}: fungi has not committed to this table")
        spec_of_run = {c[RUN_PROPERTY]: c.get(SPEC_HASH_PROPERTY) for c in self._commits(table) if RUN_PROPERTY in c}
        files = list_files(self.fs, self.data_folder, ".parquet")
        for info in files:
            run = run_of_data_file(info.base_name)
            if run not in spec_of_run and exists(self.fs, self.location.child_path(STAGING_DIR, run or "?")):
                raise ConfigError(
                    f"{self.uri}: {info.base_name} is in the table's folder but no kept commit of fungi added it "
                    "(a killed run's: the next `fungi featurize` or `fungi vacuum` on this output deletes it): the row versions "
                    "cannot be read by a glob; serve the current version only"
                )
            if run not in spec_of_run:
                raise ConfigError(
                    f"{self.uri}: {info.base_name} is in the table's folder but no kept commit of fungi added it "
                    "and no fungi run is pending (a killed run's whose _staging/ is gone, another engine's, or a "
                    "table of another catalog written into this folder): no version of the table reads it; "
                    "`fungi vacuum` deletes it once it is older than the retention, or move it out of the folder; "
                    "until then serve the current version only"
                )
            if spec_of_run[run] != latest.get(SPEC_HASH_PROPERTY):
                raise ConfigError(
                    f"{self.uri}: {info.base_name} holds rows of spec {spec_of_run[run]}, before the --overwrite to "
                    f"spec {latest.get(SPEC_HASH_PROPERTY)}: `fungi vacuum` past that run deletes it; until then "
                    "serve the current version only"
                )
        return files

    # -- maintenance --------------------------------------------------------------------------
    def vacuum(self, retention_hours: float, check_lease: Callable[[str], None]) -> dict[str, int]:
        """The format's vacuum of versions older than the retention, then fungi's files no kept version names.

        Kept: the manifest folders and error files of fungi's commits within the retention
        and of its latest commit; the setup state of the current spec. Dead runs are forgotten
        first (:meth:`_clear_dead_runs`, as the next run would), so no vacuum deletes what
        their recovery needs; a data file no version reads (a dead run's whose staging is
        gone) is the format's vacuum's to delete. ``check_lease`` (the vacuum's
        :meth:`~pipelines.lease.OutputLease.check`) runs before anything is deleted and before
        fungi's own files are: a vacuum whose lease was taken over stops there.
        """
        table = self._existing(None)
        cutoff = (time.time() - retention_hours * 3600) * 1000
        commits = [c for c in self._commits(table) if RUN_PROPERTY in c]  # newest first, read before expiring
        check_lease("nothing was vacuumed")
        self._clear_dead_runs(table, commits[0][RUN_PROPERTY] if commits else None)
        counts = {"data files": self._vacuum_table(table, retention_hours), "manifests": 0, "error files": 0,
                  "setup states": 0}
        check_lease(f"the {self.kind} versions past the retention were vacuumed; fungi's files of them were kept")
        kept = {c[MANIFEST_PROPERTY] for c in commits if c["timestamp"] >= cutoff} | {commits[0][MANIFEST_PROPERTY]}
        errors_kept: set[str] = set()
        setup_kept: set[str] = set()
        for folder in kept:
            manifest = read_manifest(self.location.join(folder))
            errors_kept |= set(manifest.error_files())
            if manifest.setup_artifact:
                setup_kept.add(manifest.setup_artifact)
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
