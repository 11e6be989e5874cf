"""A Parquet folder output: fungi's own layout, its crash-safe commit, its readers.

The run has written everything it commits into ``_staging/<run_id>/final/`` (one new
data file and error file per touched source, under the names the source always has:
:func:`pipelines.layout.data_file_name`) before the commit starts. Then:

1. the new sources table is written under a new version name (nothing refers to it yet);
   when ``--history`` starts on an output that has rows, the current data files are
   copied into the staging area first (step 3 replaces them in place);
2. **the header is replaced** (one atomic, durable write): the commit point. It names the
   new sources table and carries ``pending``: this run's id and the previous sources
   table;
3. ``apply``: each of this run's files replaces its source's file of the same name in one
   rename (one overwriting copy on S3), superseded files are deleted (files of the
   previous version that the new one does not name: sources gone with ``--prune``), the
   staging area and old table versions are deleted, and the header is written again
   without ``pending``.

Nothing committed is deleted or replaced before the header naming its replacement is
durable. A crash before step 2 leaves the previous state: the staging area of the dead
run is deleted by the next run, which holds the lease. A crash after it leaves the new
state, with ``pending`` telling the next run what to finish: every step of ``apply`` is
idempotent (a staged file that is gone was moved, a file already deleted is not missed).
Readers through :func:`read_committed` (:func:`read_output`, ``fungi eval``) read exactly
one committed state, the previous or the new one, whenever they read and whatever died:
between the commit point and the end of step 3 they read the committing run's files from
the staging area until they are moved in, and a read that a commit overlapped is redone.
Readers of the bare directory (``pyarrow.parquet.read_table(OUT)``, DuckDB, Spark) see
each source's old rows or its new ones, never both and never none; between the commit
point and the end of step 3 (seconds, or until the next run if this one is killed there)
some sources may be in their new version and others still in their old one, and an id
that moved between two sources may be seen in both or in neither.
"""
from __future__ import annotations

import logging
import posixpath
from typing import Any, Callable

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fungi_ops.errors import ConfigError
from pipelines.formats.base import Fault, OutputTable, T
from pipelines.layout import (
    BLOCKS_DIR, ERRORS_DIR, INTERNAL_SUFFIX, LOG_DIR, MANIFEST_NAME, SETUP_DIR, STAGED_SUFFIX, STAGING_DIR, staged_final_path,
)
from pipelines.manifest import Manifest, read_header, read_manifest, write_header, write_sources_table
from pipelines.storage import Location, delete_file, delete_tree, exists, list_files

log = logging.getLogger(__name__)
SEED_DIR = "seed"  # under a run's staging area: the versions --history starts from


HISTORY_SUFFIX = ".history"


def history_name(output: Location) -> str:
    """The name the manifest records for ``--history``: the folder ``<OUT>.history`` beside the output.

    Beside the output, not inside it: a reader of the output folder that descends into its
    ``_``-folders (Dask, Feast's file offline store) would read every old version as current
    rows, and Feast reads the history folder itself with Dask, which takes ``*.parquet``
    files only. The name is for people; readers find the folder with :func:`history_path`.
    """
    return posixpath.basename(output.path.rstrip("/")) + HISTORY_SUFFIX


def history_location(output: Location) -> Location:
    """The history folder of ``output`` as a location."""
    return Location(output.uri.rstrip("/") + HISTORY_SUFFIX, output.storage_options)


def history_path(root: str) -> str:
    """The path of the history folder of the output at ``root`` (a path, ``bucket/prefix`` on S3, or a URI).

    Derived from where the output is now, never from the name it was written under: an
    output copied with its history folder (a local run uploaded to S3) still finds it.
    """
    return root.rstrip("/") + HISTORY_SUFFIX


class ParquetFolder(OutputTable):
    """A folder of Parquet data files, one per input file, named the same in every version.

    Applies a run's commit one counted file operation at a time (:meth:`OutputTable.step`).
    """

    kind = "parquet"

    def __init__(self, output: Location, fault: Fault | None = None) -> None:
        super().__init__(fault)
        self.output = output
        self.fs = output.filesystem()

    @property
    def root(self) -> Location:
        """The folder itself."""
        return self.output

    @property
    def uri(self) -> str:
        """The folder's URI."""
        return self.output.uri

    def read_manifest(self) -> Manifest | None:
        """The header and sources table of the folder (None: no manifest)."""
        return read_manifest(self.output)

    def holds_foreign_data(self) -> bool:
        """Parquet files at the root of a folder without a manifest."""
        return read_header(self.output) is None and bool(list_files(self.fs, self.output.path, ".parquet"))

    def recover(self, run_id: str, *, tolerate_unreadable: bool = False) -> Manifest | None:
        """Finish a dead run's commit, delete dead runs' staging (see :func:`recover`)."""
        return recover(self.output, run_id, tolerate_unreadable=tolerate_unreadable, fault=self.fault)

    def read_files(self, read: Callable[[list[str] | None], T], version: int | None = None) -> T:
        """``read(paths)`` over exactly one committed state (:func:`read_committed`)."""
        if version is not None:
            raise ConfigError(
                f"{self.uri} is a Parquet folder, which keeps no versions to travel to; "
                "featurize into a Delta table (delta:PATH) for time travel"
            )
        return read_committed(self.output, read)

    def read(self, columns: list[str] | None = None, version: int | None = None) -> pa.Table:
        """Exactly one committed state, never a mix (:func:`read_committed`); a folder keeps no old versions.

        The bare directory (``pyarrow.parquet.read_table(OUT)``) is the same table except
        right after a run was killed in its commit; this read is correct then too.
        """
        output = self.output

        def read(paths: list[str] | None) -> pa.Table:
            if paths is None:
                raise ConfigError(f"{output.uri} is not a fungi output (no {MANIFEST_NAME})")
            if not paths:
                return pa.table({})
            return pads.dataset(paths, filesystem=output.filesystem(), format="parquet").to_table(columns=columns)

        return self.read_files(read, version)

    def commit(self, new: Manifest, previous: Manifest | None, run_id: str, *, overwrite: bool) -> None:
        """Make ``new`` the output's state (see the module docstring)."""
        new.version = (previous.version if previous else 0) + 1
        new.pending = {
            "run_id": run_id,
            "previous_sources": previous.sources_table_name if previous else None,
            "overwrite": overwrite,
            # history switched on for an output that has rows: its versions so far start it
            "seed_history": bool(new.history and previous is not None and not previous.history and not overwrite),
        }
        write_sources_table(self.output, new)
        self.step(f"write {new.sources_table_name}")
        if new.pending["seed_history"]:  # the current versions, before step 3 replaces them in place
            seed = self.staging_area(run_id).child_path(SEED_DIR)
            self.fs.create_dir(seed, recursive=True)
            for name in sorted(self._previous_files(new.pending, data_only=True)):
                self.fs.copy_file(self.output.child_path(name), f"{seed}/{name}{STAGED_SUFFIX}")
                self.step(f"copy {name} for {new.history}")
        write_header(self.output, new)
        self.step("write the header (commit point)")
        self.apply(new)

    def apply(self, manifest: Manifest) -> None:
        """Finish a committed run: move its files in, delete what it superseded (idempotent)."""
        pending = manifest.pending
        if not pending:
            return
        root, run_id = self.output.path, pending["run_id"]
        staging = self.staging_area(run_id)
        self.fs.create_dir(f"{root}/{ERRORS_DIR}", recursive=True)  # readers of _errors/ find it, empty or not
        rows = manifest.sources.to_pylist()
        current = {name for row in rows for name in (row["file"], row["error_file"]) if name}
        for name in sorted(n for row in rows if row["run_id"] == run_id for n in (row["file"], row["error_file"]) if n):
            staged, target = staged_final_path(staging, name), f"{root}/{name}"
            if not exists(self.fs, staged):
                continue  # moved by an earlier pass
            self.fs.create_dir(posixpath.dirname(target), recursive=True)
            self.fs.move(staged, target)  # replaces the source's previous file in one rename
            self.step(f"move {name}")
        if manifest.history:
            history = history_path(root)
            self.fs.create_dir(history, recursive=True)
            for info in list_files(self.fs, staging.child_path(BLOCKS_DIR), INTERNAL_SUFFIX):
                block = posixpath.basename(info.path).removesuffix(INTERNAL_SUFFIX)
                self.fs.move(info.path, f"{history}/{run_id}-{block}.parquet")
                self.step(f"keep {block} in {manifest.history}")
        if pending.get("seed_history"):
            seed = staging.child_path(SEED_DIR)
            for info in list_files(self.fs, seed, STAGED_SUFFIX):
                name = posixpath.basename(info.path).removesuffix(STAGED_SUFFIX)
                self.fs.move(info.path, f"{history}/{run_id}-seed-{name}")
                self.step(f"keep the previous {name} in {manifest.history}")
        for name in sorted(self._superseded(pending, current)):
            delete_file(self.fs, f"{root}/{name}")
            self.step(f"delete {name}")
        for info in list_files(self.fs, f"{root}/{SETUP_DIR}"):
            if f"{SETUP_DIR}/{posixpath.basename(info.path)}" != manifest.setup_artifact:
                delete_file(self.fs, info.path)  # the state of features no longer in the output
                self.step(f"delete {posixpath.basename(info.path)}")
        delete_tree(self.fs, staging.path)
        self.step("delete the staging area")
        for info in list_files(self.fs, f"{root}/{LOG_DIR}"):
            if not info.path.endswith(manifest.sources_table_name):
                delete_file(self.fs, info.path)
                self.step(f"delete {posixpath.basename(info.path)}")
        manifest.pending = None
        write_header(self.output, manifest)
        self.step("write the header (done)")

    def _superseded(self, pending: dict, current: set[str]) -> set[str]:
        """Files of the previous state that the new one does not name."""
        root = self.output.path
        if pending.get("overwrite"):
            stale = {info.path[len(root) + 1 :] for info in list_files(self.fs, root, ".parquet")}
            stale |= {info.path[len(root) + 1 :] for info in list_files(self.fs, f"{root}/{ERRORS_DIR}", INTERNAL_SUFFIX)}
            return stale - current
        return self._previous_files(pending) - current

    def _previous_files(self, pending: dict, data_only: bool = False) -> set[str]:
        """Data (and error) files the previous sources table names."""
        root = self.output.path
        previous = pending.get("previous_sources")
        if not previous or not exists(self.fs, f"{root}/{previous}"):
            return set()  # already cleaned up by an earlier pass of apply
        columns = ["file"] if data_only else ["file", "error_file"]
        table = pq.read_table(f"{root}/{previous}", columns=columns, filesystem=self.fs)
        return {n for column in table.columns for n in column.to_pylist() if n}


def recover(output: Location, run_id: str, *, tolerate_unreadable: bool = False, fault: Fault | None = None) -> Manifest | None:
    """Called by a run holding the lease: finish a dead run's commit, delete dead runs' staging.

    Returns the output's (recovered) manifest. ``tolerate_unreadable`` (``--overwrite``)
    returns None for a manifest of another format instead of raising.
    """
    try:
        manifest = read_manifest(output)
    except Exception:
        if not tolerate_unreadable:
            raise
        manifest = None
    if manifest is not None and manifest.pending:
        log.warning("finishing the commit of run %s, which died while committing", manifest.pending["run_id"])
        ParquetFolder(output, fault).apply(manifest)
    fs = output.filesystem()
    staging_root = output.child_path(STAGING_DIR)
    if exists(fs, staging_root):
        for info in fs.get_file_info(pafs.FileSelector(staging_root)):
            if posixpath.basename(info.path) != run_id:
                delete_tree(fs, info.path)  # a run that died before its commit point
    return manifest


# -- reading exactly one committed state ----------------------------------------------------

READ_ATTEMPTS = 5


def committed_files(output: Location, manifest: Manifest) -> list[str]:
    """Paths of the data files of ``manifest``'s state, where they are now.

    Until ``apply`` has moved a file of the committing run (``pending``) in, its path in
    the staging area; the output's file of that name still holds the previous version.
    Existence checks only for the committing run's sources; nothing is opened.
    """
    fs, pending = output.filesystem(), manifest.pending
    staging = ParquetFolder(output).staging_area(pending["run_id"]) if pending else None
    paths = []
    for name, run_id in zip(manifest.sources.column("file").to_pylist(), manifest.sources.column("run_id").to_pylist()):
        if not name:
            continue
        if staging is not None and run_id == pending["run_id"] and exists(fs, staged_final_path(staging, name)):
            paths.append(staged_final_path(staging, name))
        else:
            paths.append(output.child_path(name))
    return paths


def _commit_state(version: Any, pending: dict[str, Any] | None) -> tuple[Any, Any]:
    """What changes when a commit runs: the header's version, and its run still moving files in."""
    return version, (pending or {}).get("run_id")


def _current_commit_state(output: Location) -> tuple[Any, Any]:
    """:func:`_commit_state` of the header as it is now (one small read)."""
    header = read_header(output) or {}
    return _commit_state(header.get("version"), header.get("pending"))


def read_committed(output: Location, read: Callable[[list[str] | None], T]) -> T:
    """``read(paths)`` over the data files of exactly one committed state of ``output``.

    ``paths`` is None when ``output`` is not a fungi output (no manifest): ``read`` then
    reads it as it is. The commit state is read before and after; when a commit ran in
    between (its commit point, or its files moving in, or a killed run's commit being
    finished), the read is done again on the new state, up to :data:`READ_ATTEMPTS` times.
    An error of ``read`` is raised as it is, at once when no commit ran or is moving files
    in (while one is, a staged file may have moved between the listing and the read).
    """
    error: Exception | None = None
    for _ in range(READ_ATTEMPTS):
        manifest = read_manifest(output)
        before = _commit_state(manifest.version, manifest.pending) if manifest is not None else _commit_state(None, None)
        paths = committed_files(output, manifest) if manifest is not None else None
        try:
            result = read(paths)
        except Exception as exc:
            after = _current_commit_state(output)
            if after == before and after[1] is None:
                raise
            error = exc
            continue
        if _current_commit_state(output) == before:
            return result
    if error is not None:
        raise error
    raise ConfigError(f"{output.uri} was committed to during each of {READ_ATTEMPTS} reads; read it again later")
