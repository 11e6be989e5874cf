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


# The keys a ``--catalog`` JSON object may hold: pyiceberg's catalog properties of its catalog types
# (REST, SQL, Hive, Glue, DynamoDB, BigQuery; the FileIO's credentials), and its namespaced ones by
# prefix (``s3.endpoint``, ``rest.sigv4-enabled``, ``header.X-Iceberg-Access-Delegation``). A key
# outside them (``"typ"``) is refused: pyiceberg ignores unknown keys, and a misspelt one would go
# unnoticed. Another property reaches pyiceberg unchecked under ``"properties": {...}``.
CATALOG_KEYS = frozenset({
    "name", "type", "uri", "warehouse", "py-catalog-impl", "py-io-impl", "properties",
    # REST (OAuth2, signing, paging)
    "credential", "token", "scope", "audience", "resource", "oauth2-server-uri", "prefix", "cabundle",
    "snapshot-loading-mode", "rest-page-size", "namespace-separator", "scan-planning-mode",
    # SQL
    "echo", "pool_pre_ping", "init_catalog_tables", "schema_version",
    # Hive, Glue, DynamoDB (boto3 session keys)
    "ugi", "profile_name", "region_name", "botocore_session", "aws_access_key_id", "aws_secret_access_key",
    "aws_session_token", "table-name", "lock-check-min-wait-time", "lock-check-max-wait-time", "lock-check-retries",
})
CATALOG_KEY_PREFIXES = ("s3.", "gcs.", "gcp.", "adls.", "hdfs.", "oss.", "hf.", "glue.", "hive.", "dynamodb.", "rest.",
                        "client.", "header.", "auth.", "pyarrow.", "bigquery.")


def catalog_properties(catalog: str | None) -> tuple[str, dict[str, str]]:
    """(name, properties) of the Iceberg catalog that ``--catalog`` names.

    ``catalog`` is a catalog name that pyiceberg's own configuration defines
    (``~/.pyiceberg.yaml``, or ``PYICEBERG_CATALOG__<NAME>__<PROPERTY>`` variables), or a
    JSON object of catalog properties (``{"type": "rest", "uri": "https://..."}``; the keys
    :data:`CATALOG_KEYS` and :data:`CATALOG_KEY_PREFIXES` allow, others under
    ``"properties"``). None is the embedded default: pyiceberg's SQL catalog on SQLite in
    the warehouse folder ``$FUNGI_WAREHOUSE`` (default ``./fungi_warehouse``), made on first
    use. A catalog given explicitly is never made: its SQLite file must exist
    (:func:`_refuse_new_sqlite_file`), or a typo in its uri would fork the table.
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
        _refuse_unknown_keys(properties)
        passthrough = properties.pop("properties", {})
        if not isinstance(passthrough, dict):
            raise ConfigError('--catalog: "properties" must be a JSON object of catalog properties')
        properties = {**passthrough, **properties}
        name = str(properties.pop("name", DEFAULT_CATALOG_NAME))
        properties = {k: str(v) for k, v in properties.items()}
        _refuse_new_sqlite_file(properties.get("uri"))
        return name, properties
    from pyiceberg.utils.config import Config

    config = Config()
    defined = config.get_catalog_config(catalog)
    if defined is None:
        known = ", ".join(config.get_known_catalogs()) or "none"
        raise ConfigError(
            f"--catalog {catalog!r} is not a catalog of pyiceberg's configuration (~/.pyiceberg.yaml, "
            f"PYICEBERG_CATALOG__{catalog.upper()}__URI, ...; defined: {known}): define it there, or give its "
            'properties as JSON: --catalog \'{"type": "rest", "uri": "https://..."}\''
        )
    _refuse_new_sqlite_file(str(defined["uri"]) if "uri" in defined else None)
    return catalog, {}


def _refuse_unknown_keys(properties: dict[str, Any]) -> None:
    """ConfigError naming a ``--catalog`` JSON key that no catalog type reads (see :data:`CATALOG_KEYS`)."""
    import difflib

    for key in properties:
        if key in CATALOG_KEYS or key.startswith(CATALOG_KEY_PREFIXES):
            continue
        close = difflib.get_close_matches(key, sorted(CATALOG_KEYS), n=1)
        raise ConfigError(
            f"--catalog: unknown catalog property {key!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
            'a property fungi does not know goes under "properties": {"' + key + '": ...}'
        )


def _refuse_new_sqlite_file(uri: str | None) -> None:
    """ConfigError when an explicit catalog's SQLite file does not exist: pyiceberg would create an empty
    catalog there, and fungi a second table beside the real one (a typo in the uri forks the table)."""
    if not uri or not uri.startswith("sqlite:///"):
        return
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    if path in ("", ":memory:") or os.path.isfile(path):
        return
    raise ConfigError(
        f"--catalog: the SQLite catalog file {path} does not exist (uri {uri}); fungi makes no new catalog behind "
        "an explicit --catalog: check the uri, create the catalog with pyiceberg first, or leave --catalog out "
        f"for the default catalog in ${WAREHOUSE_ENV}"
    )


def load_catalog(catalog: str | None) -> Any:
    """The pyiceberg catalog ``--catalog`` names (see :func:`catalog_properties`)."""
    from pyiceberg.catalog import load_catalog as pyiceberg_load_catalog

    name, properties = catalog_properties(catalog)
    try:
        return pyiceberg_load_catalog(name, **properties)
    except Exception as exc:  # noqa: BLE001 - pyiceberg raises several types for a bad configuration
        message = str(exc)
        if "URI missing" in message:  # pyiceberg's text names a --uri flag of its own CLI
            message = f"it has no 'uri': give one in the JSON (\"uri\": ...) or PYICEBERG_CATALOG__{name.upper()}__URI"
        raise ConfigError(f"cannot open the Iceberg catalog {name!r}: {message}") from None


def table_root_kind(fs: Any, path: str) -> str | None:
    """:data:`DELTA` or :data:`ICEBERG` when the folder at ``path`` is a table's root (it has a ``_delta_log/``,
    or a ``metadata/`` with a ``*.metadata.json``); None otherwise (a missing path included)."""
    import pyarrow.fs as pafs

    path = path.rstrip("/")
    if fs.get_file_info(f"{path}/_delta_log").type == pafs.FileType.Directory:
        return DELTA
    metadata = f"{path}/metadata"
    if fs.get_file_info(metadata).type == pafs.FileType.Directory:
        if any(info.path.endswith(".metadata.json") for info in fs.get_file_info(pafs.FileSelector(metadata))):
            return ICEBERG
    return None


def refuse_table_folder(fs: Any, path: str, uri: str, flag: str = "--input") -> None:
    """ConfigError when ``path`` is a Delta or Iceberg table's folder, or a file or folder inside one
    (an Iceberg table's ``data/``, a Delta data file or partition).

    Its data files are every version's, not the table's current rows (deleted and replaced
    rows included): it must be read through the table. The path and its ancestors are
    looked at (a few metadata requests per level, whatever the number of files).
    """
    path = path.rstrip("/")
    root, depth = path, 0
    while True:
        kind = table_root_kind(fs, root)
        if kind is not None:
            break
        parent = root.rsplit("/", 1)[0] if "/" in root.strip("/") else None
        if not parent or parent == root or (uri.startswith(("s3://", "s3a://")) and "/" not in parent):
            return  # the filesystem's root, or an S3 bucket's (a bucket is no table)
        root, depth = parent, depth + 1
    root_uri = uri.rstrip("/")
    for _ in range(depth):
        root_uri = root_uri.rsplit("/", 1)[0]
    table_word = "a Delta" if kind == DELTA else "an Iceberg"
    where = f"{uri} is {table_word} table's folder" if depth == 0 else f"{uri} is inside {table_word} table at {root_uri}"
    if kind == DELTA:
        raise ConfigError(
            f"{flag} {where} (it has a _delta_log/): its files hold rows the table deleted; read it as a table: "
            f"{flag} delta:{root_uri}"
        )
    namespace, table = root_uri.rstrip("/").split("/")[-2:] if root_uri.count("/") >= 1 else ("NAMESPACE", "TABLE")
    raise ConfigError(
        f"{flag} {where} (it has metadata/*.metadata.json): its data files hold rows the table deleted; read it "
        f"through its catalog: {flag} iceberg:{namespace.removesuffix('.db')}.{table} (its name in the default "
        "catalog layout; with --catalog where another catalog holds it)"
    )
