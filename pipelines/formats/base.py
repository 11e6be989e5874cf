"""The one interface the job writes and readers read through, whatever the output's format.

The job does not know which format it writes. It plans a night against the output's
committed :class:`~pipelines.manifest.Manifest` (the sources table: which data file and error
file hold each input file's rows), stages one new data file and error file per touched
source in ``_staging/<run_id>/final/`` (:func:`pipelines.job.finalize.finalize_source`), and then
hands the next manifest to :meth:`OutputTable.commit`. A format decides:

* where the committed data files are (:attr:`OutputTable.root` and the names in the sources
  table, relative to it) and whether a name is reused across versions
  (:attr:`OutputTable.versioned_names`: a table's data files are immutable, so its names
  carry the run id; a Parquet folder replaces a source's file in place);
* the commit point: the folder's manifest header, a Delta log version, an Iceberg snapshot;
  a run killed at any instant leaves the previous state or the new one, and
  :meth:`OutputTable.recover`, called by the next run under the lease, finishes or cleans up;
* how a reader reads exactly one committed state (:meth:`OutputTable.read`), vector columns
  as fixed-size lists whatever the format stores (Delta and Iceberg have no fixed-size list:
  their dimensions are recorded in the table's properties, :data:`DIMS_PROPERTY`).

Every commit step calls :meth:`OutputTable.step` once it is durable, so that tests can kill
the process after each one (``FUNGI_COMMIT_CRASH_AFTER=N``).
"""
from __future__ import annotations

import json
import logging
import os
from abc import ABC, abstractmethod
from typing import Any, Callable, TypeVar

import pyarrow as pa

from pipelines.layout import DIMS_PROPERTY, RUN_PROPERTY, SPEC_HASH_PROPERTY, SPEC_PROPERTY, STAGING_DIR, data_file_name
from pipelines.manifest import Manifest
from pipelines.storage import Location

log = logging.getLogger(__name__)

CRASH_ENV = "FUNGI_COMMIT_CRASH_AFTER"

Fault = Callable[[int, str], None]
T = TypeVar("T")


def crash_from_env() -> Fault | None:
    """Testing hook: ``FUNGI_COMMIT_CRASH_AFTER=N`` kills the process after the N-th commit step."""
    after = os.environ.get(CRASH_ENV)
    if not after:
        return None

    def crash(count: int, what: str) -> None:
        if count == int(after):
            log.warning("%s: killing the driver after %s", CRASH_ENV, what)
            os._exit(137)

    return crash


class NothingToCommit(Exception):
    """A run of a table output that has no table yet wrote no feature row (every row failed): a table's
    columns come from its first data file, so nothing is committed and nothing of the run is left."""


class OutputTable(ABC):
    """An output in some format: its committed state, its commit, its readers.

    ``fault(count, what)`` is called after every commit step (tests raise or exit there);
    by default it comes from ``FUNGI_COMMIT_CRASH_AFTER``. :attr:`operations` lists the
    steps done, in order.
    """

    kind: str = ""
    versioned_names: bool = False  # data file names carry the run id: a committed file is never replaced
    data_dir: str = ""  # where the data files are below the root ("data/" in an Iceberg table)
    list_vectors: bool = False  # data files hold vectors as list<float>: the table format has no fixed-size list

    def __init__(self, fault: Fault | None = None) -> None:
        self.fault = fault or crash_from_env()
        self.operations: list[str] = []

    # -- where ----------------------------------------------------------------------------
    @property
    @abstractmethod
    def root(self) -> Location:
        """The folder of fungi's files for this output (manifest, errors, setup state,
        staging, lease) and of its data files, whose names in the sources table are
        relative to it."""

    @property
    @abstractmethod
    def uri(self) -> str:
        """The output as the user addressed it (for messages)."""

    def data_name(self, source: str, run_id: str) -> str:
        """The name (relative to :attr:`root`) of the data file run ``run_id`` writes for ``source``:
        :func:`pipelines.layout.data_file_name`, with the run id when names are versioned, under :attr:`data_dir`."""
        return self.data_dir + data_file_name(source, run_id if self.versioned_names else None)

    def staging_area(self, run_id: str) -> Location:
        """Where run ``run_id`` stages everything it commits (its blocks, then its final files)."""
        return self.root.join(STAGING_DIR, run_id)

    # -- state ----------------------------------------------------------------------------
    @abstractmethod
    def read_manifest(self) -> Manifest | None:
        """The committed state, or None when the output holds nothing of fungi's yet."""

    @abstractmethod
    def recover(self, run_id: str, *, tolerate_unreadable: bool = False) -> Manifest | None:
        """Called by run ``run_id`` holding the lease: finish or undo what dead runs left.

        Returns the committed manifest. ``tolerate_unreadable`` (``--overwrite``) returns
        None for a state this version cannot read instead of raising.
        """

    @abstractmethod
    def holds_foreign_data(self) -> bool:
        """Whether the output holds data that fungi did not write (refused without --overwrite)."""

    # -- commit ---------------------------------------------------------------------------
    @abstractmethod
    def commit(self, new: Manifest, previous: Manifest | None, run_id: str, *, overwrite: bool) -> None:
        """Make ``new`` the committed state: one atomic step that every reader sees whole.

        ``new.sources`` names this run's files (``run_id`` column) that are staged in
        ``staging_area(run_id)/final/`` under their names.
        """

    def committed(self) -> bool:
        """Whether the commit point of the current :meth:`commit` has been passed."""
        return any("commit point" in what for what in self.operations)

    def step(self, what: str) -> None:
        """Record a durable commit step (and let the fault hook crash after it)."""
        self.operations.append(what)
        if self.fault:
            self.fault(len(self.operations), what)

    # -- readers --------------------------------------------------------------------------
    @abstractmethod
    def read_files(self, read: Callable[[list[str] | None], T], version: int | None = None) -> T:
        """``read(paths)`` over the data files of exactly one committed state (the current one,
        or ``version``), as paths on :attr:`root`'s filesystem; ``paths`` is None when the
        output holds nothing of fungi's (``read`` may then read it as a plain table).

        The files are fungi's own Parquet files, with the ``fungi.spec`` metadata in every
        one; vectors are fixed-size lists in a folder, ``list<float>`` of one length in a
        table (:attr:`list_vectors`). ``fungi eval`` reads through this.
        """

    @abstractmethod
    def read(self, columns: list[str] | None = None, version: int | None = None) -> pa.Table:
        """The feature rows of exactly one committed state (the current one, or ``version``),
        vector columns as fixed-size lists."""


def restore_vectors(table: pa.Table, dims: dict[str, int]) -> pa.Table:
    """``table`` with the variable-size list columns named in ``dims`` cast to fixed-size lists.

    Delta and Iceberg store vectors as ``list<float>``; every reader of fungi gets them back
    as ``fixed_size_list<float>[dim]``, as a Parquet folder holds them.
    """
    for name, dim in dims.items():
        if name not in table.column_names:
            continue
        column = table.column(name)
        if pa.types.is_fixed_size_list(column.type):
            continue
        target = pa.list_(pa.field("item", column.type.value_type), dim)
        table = table.set_column(table.column_names.index(name), name, column.cast(target))
    return table


def manifest_dims(spec: dict[str, Any]) -> dict[str, int]:
    """{column: dimension} of the vector columns a (global) spec writes: what a table's readers restore."""
    dims = {"embedding": int(spec["embed_dim"])}
    dims.update({f"grad_{o['name']}": int(spec["projection_dim"]) for o in spec.get("objectives", [])})
    return dims


def as_lists(table: pa.Table) -> pa.Table:
    """``table`` with its fixed-size list columns as ``list<...>``: how a Delta or Iceberg file holds vectors."""
    for index, column in enumerate(table.schema):
        if pa.types.is_fixed_size_list(column.type):
            target = pa.list_(pa.field("element", column.type.value_type))
            table = table.set_column(index, pa.field(column.name, target, column.nullable),
                                     table.column(index).cast(target))
    return table


def table_properties(manifest: Manifest, run_id: str) -> dict[str, Any]:
    """What a table version records of fungi: spec, spec hash, dimensions, run, row counts."""
    return {
        SPEC_PROPERTY: json.dumps(manifest.spec, sort_keys=True, separators=(",", ":")),
        SPEC_HASH_PROPERTY: manifest.spec_hash,
        "fungi.model": str(manifest.spec.get("model")),
        "fungi.objectives": ",".join(o["name"] for o in manifest.spec.get("objectives", [])),
        "fungi.projection_seed": str(manifest.spec.get("seed")),
        DIMS_PROPERTY: json.dumps(manifest_dims(manifest.spec), sort_keys=True),
        RUN_PROPERTY: run_id,
        "fungi.rows": str(manifest.rows),
        "fungi.errors": str(manifest.errors),
    }
