"""Where a job reads and writes: a Parquet folder, a Delta table or an Iceberg table.

One spelling for ``--input``, ``--output``, ``fungi eval`` and ``fungi feast``:

* ``PATH`` or ``s3://bucket/prefix``: a folder of Parquet files (fungi's own layout for an
  output);
* ``delta:PATH`` or ``delta:s3://bucket/prefix``: a Delta Lake table, addressed by its
  folder (no catalog: the table's ``_delta_log/`` is its state);
* ``iceberg:NAMESPACE.TABLE``: an Apache Iceberg table in a pyiceberg catalog
  (:func:`load_catalog`): REST, Glue, Hive, SQL, ... by configuration, the embedded SQL
  catalog on SQLite in a local warehouse by default.

A folder that holds a table's own log (``_delta_log/``, or Iceberg's ``metadata/``) is
refused as a plain Parquet input (:func:`refuse_table_folder`): its data files include rows
the table has deleted.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from fungi_ops.errors import ConfigError
from pipelines.storage import parse_json_object

PARQUET, DELTA, ICEBERG = "parquet", "delta", "iceberg"
WAREHOUSE_ENV = "FUNGI_WAREHOUSE"
DEFAULT_WAREHOUSE = "fungi_warehouse"
DEFAULT_CATALOG_NAME = "fungi"


@dataclass(frozen=True)
class TableAddress:
    """A parsed address: ``kind`` (parquet, delta, iceberg) and ``target``.

    ``target`` is the folder (local path or ``s3://`` URI) of a Parquet folder or a Delta
    table, and ``NAMESPACE.TABLE`` of an Iceberg table.
    """

    kind: str
    target: str

    @property
    def is_table(self) -> bool:
        """Whether this is a table format (Delta or Iceberg), not a Parquet folder."""
        return self.kind != PARQUET

    @property
    def identifier(self) -> tuple[str, str]:
        """(namespace, table) of an Iceberg address; the namespace may be dotted."""
        namespace, _, table = self.target.rpartition(".")
        return namespace, table

    def __str__(self) -> str:
        return self.target if self.kind == PARQUET else f"{self.kind}:{self.target}"


def parse_address(text: str, flag: str = "--output") -> TableAddress:
    """The address ``text`` names; ConfigError naming ``flag`` when it is malformed."""
    text = text.strip()
    for kind in (DELTA, ICEBERG):
        if text.startswith(f"{kind}:"):
            target = text[len(kind) + 1 :]
            if target.startswith("//") and kind == ICEBERG:
                target = target[2:]
            if not target:
                raise ConfigError(f"{flag} {text!r} names no table: {kind}:{'PATH' if kind == DELTA else 'NAMESPACE.TABLE'}")
            if kind == ICEBERG:
                namespace, _, table = target.rpartition(".")
                if not namespace or not table or "/" in target:
                    raise ConfigError(
                        f"{flag} {text!r}: an Iceberg table is named iceberg:NAMESPACE.TABLE (e.g. iceberg:lake.features)"
                    )
            return TableAddress(kind, target)
    if not text:
        raise ConfigError(f"{flag} is empty")
    return TableAddress(PARQUET, text)


def catalog_properties(catalog: str | None) -> tuple[str, dict[str, str]]:
    """(name, properties) of the Iceberg catalog that ``--catalog`` names.

    ``catalog`` is a catalog name that pyiceberg's own configuration defines
    (``~/.pyiceberg.yaml``, or ``PYICEBERG_CATALOG__<NAME>__<PROPERTY>`` variables), or a
    JSON object of catalog properties (``{"type": "rest", "uri": "https://..."}``). None
    is the embedded default: pyiceberg's SQL catalog on SQLite in the warehouse folder
    ``$FUNGI_WAREHOUSE`` (default ``./fungi_warehouse``), made on first use.
    """
    if catalog is None:
        warehouse = os.path.abspath(os.environ.get(WAREHOUSE_ENV, DEFAULT_WAREHOUSE))
        os.makedirs(warehouse, exist_ok=True)
        return DEFAULT_CATALOG_NAME, {
            "type": "sql",
            "uri": f"sqlite:///{warehouse}/catalog.db",
            "warehouse": f"file://{warehouse}",
        }
    if catalog.lstrip().startswith("{"):
        properties = parse_json_object(catalog, "--catalog (a catalog name or a JSON object of catalog properties)")
        return str(properties.pop("name", DEFAULT_CATALOG_NAME)), {k: str(v) for k, v in properties.items()}
    return catalog, {}


def load_catalog(catalog: str | None) -> Any:
    """The pyiceberg catalog ``--catalog`` names (see :func:`catalog_properties`)."""
    from pyiceberg.catalog import load_catalog as pyiceberg_load_catalog

    name, properties = catalog_properties(catalog)
    try:
        return pyiceberg_load_catalog(name, **properties)
    except Exception as exc:  # noqa: BLE001 - pyiceberg raises several types for a bad configuration
        raise ConfigError(f"cannot open the Iceberg catalog {name!r}: {exc}") from None


def refuse_table_folder(fs: Any, path: str, uri: str, flag: str = "--input") -> None:
    """ConfigError when the folder at ``path`` is a Delta or Iceberg table's own folder.

    Its data files are every version's, not the table's current rows (deleted and replaced
    rows included): it must be read through the table.
    """
    import pyarrow.fs as pafs

    if fs.get_file_info(f"{path.rstrip('/')}/_delta_log").type == pafs.FileType.Directory:
        raise ConfigError(
            f"{flag} {uri} is a Delta table (it has a _delta_log/): its folder holds rows the table deleted; "
            f"read it as a table: {flag} delta:{uri}"
        )
    metadata = f"{path.rstrip('/')}/metadata"
    if fs.get_file_info(metadata).type == pafs.FileType.Directory:
        names = [info.path for info in fs.get_file_info(pafs.FileSelector(metadata))]
        if any(name.endswith(".metadata.json") for name in names):
            raise ConfigError(
                f"{flag} {uri} is an Iceberg table's folder (it has metadata/*.metadata.json): its data files hold "
                f"rows the table deleted; read it through its catalog: {flag} iceberg:NAMESPACE.TABLE (--catalog)"
            )
