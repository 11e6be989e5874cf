"""An Apache Iceberg output (``iceberg:NAMESPACE.TABLE`` in a pyiceberg catalog): one run is one snapshot.

The commit path is :class:`~pipelines.formats.table.LakeTable`'s; here are Iceberg's parts.
The table lives where its catalog puts it (the catalog's default location,
``<warehouse>/<namespace>/<table>`` for the embedded SQL catalog); fungi's own files sit
beside ``data/`` and ``metadata/`` in that folder. The commit point is **one catalog commit**
of one transaction: a snapshot that appends this run's data files and deletes the files they
supersede (an APPEND snapshot when nothing is deleted, else an OVERWRITE one), fungi's
properties in its summary, and the same properties set on the table. The first run creates
the table in that same commit (``create_table_transaction``): a kill before it leaves no table.

* The data files are fungi's own Parquet files, registered as they are (pyiceberg computes
  their column statistics from their footers): they carry no Iceberg field ids, so the table
  has a name mapping (``schema.name-mapping.default``), as for files added with
  ``add_files``; Spark, Trino, pyiceberg and Polars read them through it.
* ``commit.retry.num-retries`` is 0: a concurrent commit fails ours (pyiceberg's
  ``CommitFailedException``) instead of being retried over a state this run never planned.
* ``--overwrite`` with another spec may change the columns: the table's schema is evolved
  in the same commit, and the name mapping keeps a dropped column's name for the older
  snapshots (time travel across the change).
* Time travel: a snapshot id (``fungi eval --version``, :func:`pipelines.formats.read_output`).
* A table is created only where no table is: not in a location that holds another table's
  metadata or fungi's committed files (another catalog's table: a second one would fork it),
  and not over an empty table of the same name made elsewhere unless ``--overwrite`` adopts it.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from fungi_ops.errors import ConfigError
from pipelines.formats.address import TableAddress, load_catalog, table_root_kind
from pipelines.formats.base import Fault
from pipelines.formats.sources import location_uri
from pipelines.formats.table import CommitConflict, LakeTable
from pipelines.layout import STAGING_DIR, VERSIONS_DIR
from pipelines.storage import Location, delete_file, exists, list_files

NAME_MAPPING_PROPERTY = "schema.name-mapping.default"
TABLE_DEFAULTS = {"commit.retry.num-retries": "0"}  # a conflict fails our commit: never retried unplanned


class _Version:
    """A handle: the loaded table and one of its snapshots (the current one unless time travelling).

    The snapshot's files are planned once per handle (a read of every manifest: O(files)) and
    kept: the drift check, the commit's removals and the readers all use the same planning.
    """

    def __init__(self, table: Any, snapshot: Any) -> None:
        self.table, self.snapshot = table, snapshot
        self._tasks: list[Any] | None = None

    def tasks(self) -> list[Any]:
        """The snapshot's scan tasks (a data file and the delete files that apply to it)."""
        if self._tasks is None:
            self._tasks = list(self.table.scan(snapshot_id=self.snapshot.snapshot_id).plan_files())
        return self._tasks


class IcebergOutput(LakeTable):
    """An Iceberg table written by fungi: fungi's lineage in its own files, the table's state in its catalog."""

    kind = "iceberg"
    version_word = "snapshot"
    data_dir = "data/"

    def __init__(self, address: TableAddress, catalog: str | None, storage_options: dict[str, Any],
                 fault: Fault | None = None) -> None:
        self.address = address
        self.catalog = load_catalog(catalog)
        self.identifier = address.identifier
        loaded = self._load()
        location = loaded.metadata.location if loaded is not None else self._default_location()
        super().__init__(Location(location_uri(location), storage_options), fault)
        self.location_uri = location.rstrip("/")  # the table's own spelling (file://..., s3://...): data file paths
        if loaded is None:
            self._refuse_occupied_location()

    @property
    def uri(self) -> str:
        """``iceberg:NAMESPACE.TABLE``."""
        return str(self.address)

    # -- the catalog -------------------------------------------------------------------------
    def _load(self) -> Any:
        from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError

        try:
            return self.catalog.load_table(self.identifier)
        except (NoSuchTableError, NoSuchNamespaceError):
            return None

    def _default_location(self) -> str:
        """Where the catalog puts a new table (its namespace's location or the warehouse's convention)."""
        from pyiceberg.exceptions import NoSuchNamespaceError

        namespace, name = self.identifier
        resolve = getattr(self.catalog, "_resolve_table_location", None)
        if resolve is not None:
            try:
                return resolve(None, namespace, name)
            except NoSuchNamespaceError:
                pass
        warehouse = self.catalog.properties.get("warehouse")
        if not warehouse:
            raise ConfigError(
                f"{self.uri}: the Iceberg catalog has no warehouse location for a new table; create the table's "
                "namespace with a location, or give the catalog a 'warehouse' property"
            )
        return f"{warehouse.rstrip('/')}/{namespace.replace('.', '/')}/{name}"

    def _refuse_occupied_location(self) -> None:
        """ConfigError when the folder a new table would take already holds a table: Iceberg metadata, a
        Delta log, or the manifest of a fungi run that committed (a killed first run's files, with its
        staging area, are recovered instead). Another catalog's table is there (a typo in ``--catalog``,
        a dropped table's files): a second table in its folder would fork it."""
        kind = table_root_kind(self.fs, self.location.path)
        versions = pafs.FileSelector(self.location.child_path(VERSIONS_DIR), allow_not_found=True)
        committed = [] if kind else [
            info.base_name for info in self.fs.get_file_info(versions)
            if not exists(self.fs, self.location.child_path(STAGING_DIR, info.base_name))
        ]
        if kind or committed:
            what = f"{'an Iceberg' if kind == 'iceberg' else 'a Delta'} table's metadata" if kind else \
                f"fungi's committed files (run {committed[0]})"
            raise ConfigError(
                f"{self.uri} is not in this Iceberg catalog, but its location {self.location.uri} already holds "
                f"{what}: another catalog's table (check --catalog: a typo in its uri names another catalog), or "
                "the files of a dropped table; use the catalog that holds it, register it in this one "
                "(catalog.register_table), or move the folder away"
            )

    def holds_foreign_data(self) -> bool:
        """Also refuses an empty table of this name that fungi did not create (no snapshot: nothing to lose,
        but its columns are not fungi's): ``--overwrite`` adopts it, or another name avoids it."""
        loaded = self._load()
        if loaded is not None and loaded.current_snapshot() is None:
            raise ConfigError(
                f"{self.uri} already exists in the Iceberg catalog, empty (no snapshot) with columns of its own "
                f"({', '.join(loaded.schema().column_names)}); fungi creates its tables: --overwrite makes it fungi's "
                "(its columns replaced), or write to another table name"
            )
        return super().holds_foreign_data()

    def _table(self, version: int | None = None) -> _Version | None:
        """The table at its current snapshot or at snapshot ``version``; None: no table (or no snapshot yet)."""
        table = self._load()
        if table is None:
            if version is not None:
                raise ConfigError(f"{self.uri} does not exist in the Iceberg catalog")
            return None
        snapshot = table.current_snapshot() if version is None else table.snapshot_by_id(version)
        if snapshot is None:
            if version is not None:
                raise ConfigError(f"{self.uri} has no snapshot {version} (expired, or never one of this table)")
            return None
        return _Version(table, snapshot)

    def _commits(self, table: _Version) -> Iterator[dict[str, Any]]:
        """Snapshot summaries from ``table``'s snapshot back along its parents (newest first; the table's metadata,
        in memory: no read per snapshot)."""
        snapshot = table.snapshot
        while snapshot is not None:
            yield {**snapshot.summary.additional_properties, "timestamp": snapshot.timestamp_ms,
                   "version": snapshot.snapshot_id}
            parent = snapshot.parent_snapshot_id
            snapshot = table.table.snapshot_by_id(parent) if parent is not None else None

    def _table_files(self, table: _Version) -> set[str]:
        """The data files of the snapshot, and any delete files another engine added (they break the lineage)."""
        names: set[str] = set()
        for task in table.tasks():
            names.add(self._relative(task.file.file_path))
            names.update(self._relative(d.file_path) for d in task.delete_files)
        return names

    def _version_of(self, table: _Version) -> int:
        return table.snapshot.snapshot_id

    # -- commit -------------------------------------------------------------------------------
    def _write_version(self, table: _Version | None, added: list[str], removed: list[str], properties: dict[str, str], *,
                       overwrite: bool) -> None:
        """One catalog commit: the table's creation (first run) or one snapshot of appends and deletes."""
        from pyiceberg.exceptions import CommitFailedException, TableAlreadyExistsError

        try:
            empty = self._load() if table is None and overwrite else None
            if empty is not None:  # --overwrite of an empty table made elsewhere (holds_foreign_data)
                transaction = empty.transaction()
                transaction.set_properties(TABLE_DEFAULTS)
                self._replace_schema(transaction, added[0])
                current: dict[str, Any] = {}
            elif table is None:
                transaction = self._create_transaction(added[0])
                current = {}
            else:
                transaction = table.table.transaction()
                current = {self._relative(t.file.file_path): t.file for t in table.tasks()}
                if overwrite:
                    self._replace_schema(transaction, added[0] if added else None)
            transaction.set_properties(properties)
            update = transaction.update_snapshot(snapshot_properties=properties)
            with (update.overwrite() if removed else update.fast_append()) as snapshot:
                for name in removed:
                    snapshot.delete_data_file(current[name])
                for name in added:
                    snapshot.append_data_file(self._data_file(transaction, name))
            transaction.commit_transaction()
        except (CommitFailedException, TableAlreadyExistsError) as exc:
            raise CommitConflict(str(exc)) from None

    def _create_transaction(self, first_file: str) -> Any:
        """The transaction that creates the table (schema from our first data file) in the commit itself."""
        namespace, _ = self.identifier
        self.catalog.create_namespace_if_not_exists(namespace)
        schema = self._file_schema(first_file)
        transaction = self.catalog.create_table_transaction(
            self.identifier, schema=schema, location=self.location_uri, properties=TABLE_DEFAULTS,
        )
        self._set_name_mapping(transaction)
        return transaction

    @staticmethod
    def _set_name_mapping(transaction: Any) -> None:
        """Map the table's current column names to their field ids: fungi's data files carry no field ids."""
        transaction.set_properties({NAME_MAPPING_PROPERTY: transaction.table_metadata.schema().name_mapping.model_dump_json()})

    def _replace_schema(self, transaction: Any, first_file: str | None) -> None:
        """``--overwrite``: make the table's columns those of the new files (a new spec may change them).

        pyiceberg's schema update keeps the name mapping's entries of a dropped column (as Iceberg's
        own engines do): the older snapshots' files, which carry no field ids, are read through the
        table's one mapping, so time travel to a snapshot before the change still finds that column.
        A table fungi did not create (an empty one adopted by ``--overwrite``) has no mapping yet:
        it gets one here, or fungi's files (no field ids) could not be read.
        """
        if first_file is None:
            return
        schema = self._file_schema(first_file)
        current = transaction.table_metadata.schema()
        if not current.as_arrow().equals(_iceberg_arrow(schema), check_metadata=False):
            with transaction.update_schema(allow_incompatible_changes=True) as update:  # updates the name mapping too
                for field in current.fields:
                    if field.name not in schema.names:
                        update.delete_column(field.name)
                update.union_by_name(schema)
        if NAME_MAPPING_PROPERTY not in transaction.table_metadata.properties:
            self._set_name_mapping(transaction)

    def _data_file(self, transaction: Any, name: str) -> Any:
        """The Iceberg DataFile of one of our files: size, row count and column statistics from its footer."""
        from pyiceberg.io.pyarrow import parquet_file_to_data_file

        try:
            return parquet_file_to_data_file(transaction._table.io, transaction.table_metadata,
                                             f"{self.location_uri}/{name}")
        except ValueError as exc:
            raise ConfigError(f"{self.uri}: {name} does not match the table's columns ({exc})") from None

    # -- readers and maintenance ----------------------------------------------------------------
    def _read_rows(self, table: _Version, columns: list[str] | None) -> pa.Table:
        scan = table.table.scan(snapshot_id=table.snapshot.snapshot_id,
                                selected_fields=tuple(columns) if columns else ("*",))
        return scan.to_arrow()

    def _vacuum_table(self, table: _Version, retention_hours: float) -> int:
        """Expire the snapshots older than the retention (the current one is kept), then delete the data
        files under ``data/`` that no remaining snapshot reads (pyiceberg's expiry deletes no file)."""
        cutoff = datetime.fromtimestamp(time.time() - retention_hours * 3600, tz=timezone.utc)
        table.table.maintenance.expire_snapshots().older_than(cutoff).commit()
        remaining = self._load()
        read: set[str] = set()
        for snapshot in remaining.snapshots():
            read |= self._table_files(_Version(remaining, snapshot))
        deleted = 0
        for info in list_files(self.fs, self.data_folder, ".parquet"):
            if self._relative(info.path) not in read and info.mtime and info.mtime.timestamp() < cutoff.timestamp():
                delete_file(self.fs, info.path)
                deleted += 1
        return deleted


def _iceberg_arrow(schema: pa.Schema) -> pa.Schema:
    """``schema`` as an Iceberg table gives it back (list items named ``element``), to compare columns."""
    from pyiceberg.io.pyarrow import _pyarrow_to_schema_without_ids

    return _pyarrow_to_schema_without_ids(schema).as_arrow()
