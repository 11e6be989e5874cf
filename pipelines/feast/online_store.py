"""Feast's SQLite online store with working sqlite-vec vector search, on any Python.

``fungi feast`` writes ``type: pipelines.feast_online.FungiSqliteOnlineStore`` in
``feature_store.yaml`` (:mod:`pipelines.feast_online` re-exports this module under that name).
This is Feast's own :class:`SqliteOnlineStore` (same tables, same
online reads, same ``feast apply`` / ``materialize`` code paths) with four defects of
Feast 0.67's SQLite vector search fixed or worked around:

* Feast loads sqlite-vec only on Python 3.10 (``sys.version_info[0:2] == (3, 10)``), and
  through ``Connection.enable_load_extension``, which Pythons built without
  ``--enable-loadable-sqlite-extensions`` (pyenv's default) do not have. Here sqlite-vec is
  loaded on any Python: with ``enable_load_extension`` when it exists, else registered as
  an auto-extension of the SQLite library that Python's ``_sqlite3`` module uses.
* ``retrieve_online_documents_v2`` copied every vector into a ``vec_table`` kept in the
  database and queried it with ``LIMIT``: the second query fails (``UNIQUE constraint
  failed on vec_table primary key``), two feature views share the table, and SQLite
  older than 3.41 refuses ``LIMIT`` on a vec0 KNN query. Here the search is one exact
  scan with sqlite-vec's distance functions over the feature view's own table
  (``vec_distance_cosine`` for ``vector_search_metric="COSINE"``), so it is repeatable,
  per view, and works on any SQLite. vec0 0.1.x is a flat index too, so nothing is lost.
* ``online_write_batch`` packed every list feature to the indexed field's length (a
  gradient of another size than the embedding failed with ``struct.error``; a list kept
  column failed to bind). Here only the indexed field gets a ``vector_value``, and rows
  are written with one ``executemany`` per batch.
* ``FeatureStore.retrieve_online_documents_v2`` lays the hits' features out in the order of
  their entity keys sorted by value, but their ids in the order the store returned them:
  hits returned nearest first got each other's features and distances. Here the hits are
  returned sorted by entity key, so every id keeps its own features and ``distance``
  (sort the response by ``distance`` for the ranking).

Text search (``query_string``) is left to Feast's implementation. Feast has no way to delete
an entity's rows: :func:`delete_entities` does it, for the ids an output no longer holds
(:mod:`pipelines.feast.deletions`).
"""
from __future__ import annotations

import ctypes
import glob
import logging
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple, Union

import numpy as np
from feast.feature_view import FeatureView
from feast.infra.key_encoding_utils import deserialize_entity_key, serialize_entity_key
from feast.infra.online_stores.helpers import extract_text_and_num
from feast.infra.online_stores.sqlite import (
    SqliteFilterTranslator,
    SqliteOnlineStore,
    SqliteOnlineStoreConfig,
    _quote_id,
    _table_id,
)
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.repo_config import RepoConfig
from feast.utils import _get_feature_view_vector_field_metadata, to_naive_utc

from pipelines.feast import STORE_TYPE

logger = logging.getLogger(__name__)


# vector_search_metric of the indexed Field -> sqlite-vec scalar distance function
DELETE_CHUNK = 500  # entity keys per DELETE statement (SQLite's default limit is 999 variables)
DISTANCE_FUNCTIONS = {"cosine": "vec_distance_cosine", "l2": "vec_distance_l2", "l1": "vec_distance_l1"}

_auto_extension_lock = threading.Lock()
_auto_extension_registered = False
_keep_loaded: list[Any] = []  # ctypes handles of the auto-extension, alive for the process


class FungiSqliteOnlineStoreConfig(SqliteOnlineStoreConfig):
    """``online_store`` of ``feature_store.yaml``: as Feast's ``sqlite`` (``path``, ``vector_enabled``, ...)."""

    type: Literal["pipelines.feast_online.FungiSqliteOnlineStore"] = STORE_TYPE  # type: ignore[assignment]


class FungiSqliteOnlineStore(SqliteOnlineStore):
    """Feast's SQLite online store; sqlite-vec search that works on any Python and SQLite."""

    def _get_conn(self, config: RepoConfig) -> sqlite3.Connection:
        if not self._conn:
            db_path = self._get_db_path(config)
            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
            self._conn = connect(db_path, vector=bool(config.online_store.vector_enabled))
        return self._conn

    def online_write_batch(
        self,
        config: RepoConfig,
        table: FeatureView,
        data: List[Tuple[EntityKeyProto, Dict[str, ValueProto], datetime, Optional[datetime]]],
        progress: Optional[Callable[[int], Any]],
    ) -> None:
        """Upsert rows as Feast's SQLite store does; only the indexed field gets a ``vector_value``."""
        conn = self._get_conn(config)
        table_name = _table_id(config.project, table, config.registry.enable_online_feature_view_versioning)
        vector_field = _get_feature_view_vector_field_metadata(table) if config.online_store.vector_enabled else None
        vector_name = vector_field.name if vector_field else None
        vector_length = vector_field.vector_length if vector_field else 0
        with_num = bool(getattr(config.online_store, "enable_openai_compatible_store", False)) and (
            self._check_table_has_value_num(conn, table_name)
        )
        columns = ["entity_key", "feature_name", "value", "value_text"]
        columns += ["value_num"] if with_num else []
        columns += ["vector_value", "event_ts", "created_ts"]
        updates = ", ".join(f"{c} = excluded.{c}" for c in columns[2:])
        sql = (
            f"INSERT INTO {_quote_id(table_name)} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
            f"ON CONFLICT(entity_key, feature_name) DO UPDATE SET {updates}"
        )
        rows: list[tuple] = []
        for entity_key, values, timestamp, created_ts in data:
            key = serialize_entity_key(entity_key, entity_key_serialization_version=config.entity_key_serialization_version)
            event_ts = to_naive_utc(timestamp)
            created = to_naive_utc(created_ts) if created_ts is not None else None
            for feature_name, value in values.items():
                text, number = extract_text_and_num(value, with_num)
                row: list[Any] = [key, feature_name, value.SerializeToString(), text]
                if with_num:
                    row.append(number)
                vector = None
                if feature_name == vector_name and value.WhichOneof("val") is not None:
                    vector = _vector_blob(value, vector_length, f"{table.name}:{feature_name}")
                row += [vector, event_ts, created]
                rows.append(tuple(row))
        with conn:
            conn.executemany(sql, rows)
        if progress:
            progress(len(data))

    def retrieve_online_documents_v2(
        self,
        config: RepoConfig,
        table: FeatureView,
        requested_features: List[str],
        embedding: Optional[List[float]],
        top_k: int,
        distance_metric: Optional[str] = None,
        query_string: Optional[str] = None,
        filters: Any = None,
        include_feature_view_version_metadata: bool = False,
    ) -> List[Tuple[Optional[datetime], Optional[EntityKeyProto], Optional[Dict[str, ValueProto]]]]:
        """The ``top_k`` rows nearest to ``embedding`` by the indexed field's metric.

        Each result carries the requested features and ``distance`` (cosine distance,
        ``1 - cos``, for ``vector_search_metric="COSINE"``). They come back ordered by entity
        key, not by distance (see the end of this method): sort them by ``distance``.
        """
        if embedding is None or query_string is not None or not config.online_store.vector_enabled:
            return super().retrieve_online_documents_v2(
                config, table, requested_features, embedding, top_k, distance_metric, query_string, filters,
                include_feature_view_version_metadata,
            )
        field = _get_feature_view_vector_field_metadata(table)
        if field is None:
            raise ValueError(f"feature view {table.name} has no vector-indexed field (Field(..., vector_index=True))")
        metric = (field.vector_search_metric or distance_metric or "cosine").lower()
        if metric not in DISTANCE_FUNCTIONS:
            raise ValueError(
                f"vector_search_metric {metric!r} of {table.name}:{field.name} is not supported by sqlite-vec; "
                f"use one of {', '.join(m.upper() for m in DISTANCE_FUNCTIONS)}"
            )
        length = field.vector_length or len(embedding)
        query = _float32_blob(embedding, length, f"query for {table.name}:{field.name}")
        conn = self._get_conn(config)
        raw_name = _table_id(config.project, table, config.registry.enable_online_feature_view_versioning)
        table_name = _quote_id(raw_name)
        where, params = "", []
        if filters is not None:
            if not getattr(config.online_store, "enable_openai_compatible_store", False):
                raise ValueError(
                    "Metadata filtering requires `enable_openai_compatible_store: true` in the online store config "
                    "(then run `feast apply`)"
                )
            clause, params = SqliteFilterTranslator(raw_name, alias="fv").translate(filters)
            where = f" AND {clause}" if clause else ""
        nearest = conn.execute(
            f"SELECT fv.entity_key, {DISTANCE_FUNCTIONS[metric]}(fv.vector_value, ?) AS distance "
            f"FROM {table_name} AS fv WHERE fv.feature_name = ? AND fv.vector_value IS NOT NULL{where} "
            f"ORDER BY distance LIMIT ?",
            [query, field.name, *params, int(top_k)],
        ).fetchall()
        if not nearest:
            return []
        keys = [key for key, _ in nearest]
        values: Dict[bytes, Dict[str, ValueProto]] = {key: {} for key in keys}
        stamps: Dict[bytes, Optional[datetime]] = {}
        wanted = set(requested_features or []) | {field.name}
        for key, feature_name, blob, event_ts in conn.execute(
            f"SELECT entity_key, feature_name, value, event_ts FROM {table_name} "
            f"WHERE entity_key IN ({', '.join('?' * len(keys))})",
            keys,
        ):
            if feature_name in wanted:
                proto = ValueProto()
                proto.ParseFromString(blob)
                values[key][feature_name] = proto
            stamps[key] = _aware(event_ts)
        results = []
        for key, distance in nearest:
            features = dict(values[key])
            features["distance"] = ValueProto(float_val=float(distance))
            entity = deserialize_entity_key(key, entity_key_serialization_version=config.entity_key_serialization_version)
            results.append((stamps.get(key), entity, features))
        # FeatureStore.retrieve_online_documents_v2 (0.67) lays the features out in the order of
        # the entities sorted by value, and the entity columns in the order it receives them:
        # hand them over sorted, or each row would get another row's features and distance.
        results.sort(key=lambda row: _entity_order(row[1]))
        return results


def delete_entities(store: SqliteOnlineStore, config: RepoConfig, views: Sequence[FeatureView], join_key: str,
                    ids: Sequence[str]) -> int:
    """Delete every row of the entities ``join_key`` = each of ``ids`` (strings) from the online tables of
    ``views``; returns how many of the ids had rows.

    Feast has no delete: this is for ids the offline source no longer holds
    (:mod:`pipelines.feast.deletions`). The vector search of :class:`FungiSqliteOnlineStore`
    scans these tables, so a deleted id is neither looked up nor found. A view whose table
    does not exist yet (never applied) is skipped.
    """
    conn = store._get_conn(config)
    versioning = config.registry.enable_online_feature_view_versioning
    keys = [
        serialize_entity_key(EntityKeyProto(join_keys=[join_key], entity_values=[ValueProto(string_val=str(i))]),
                             entity_key_serialization_version=config.entity_key_serialization_version)
        for i in ids
    ]
    found: set[bytes] = set()
    with conn:
        for view in views:
            table = _quote_id(_table_id(config.project, view, versioning))
            for start in range(0, len(keys), DELETE_CHUNK):
                chunk = keys[start:start + DELETE_CHUNK]
                marks = ", ".join("?" * len(chunk))
                try:
                    found.update(key for (key,) in conn.execute(
                        f"SELECT DISTINCT entity_key FROM {table} WHERE entity_key IN ({marks})", chunk))
                except sqlite3.OperationalError as exc:
                    if "no such table" in str(exc):
                        break
                    raise
                conn.execute(f"DELETE FROM {table} WHERE entity_key IN ({marks})", chunk)
    return len(found)


def connect(db_path: str, vector: bool = True) -> sqlite3.Connection:
    """A connection as Feast opens it, with sqlite-vec's functions available when ``vector``."""
    if vector and not hasattr(sqlite3.Connection, "enable_load_extension"):
        register_sqlite_vec_auto_extension()
    conn = sqlite3.connect(
        db_path, detect_types=sqlite3.PARSE_DECLTYPES | sqlite3.PARSE_COLNAMES, check_same_thread=False
    )
    if vector and not _has_sqlite_vec(conn):
        load_sqlite_vec(conn)
    return conn


def load_sqlite_vec(conn: sqlite3.Connection) -> None:
    """Load sqlite-vec into an open connection (``enable_load_extension`` where Python has it)."""
    try:
        import sqlite_vec
    except ModuleNotFoundError as exc:
        raise RuntimeError("vector search needs the sqlite-vec package: pip install 'fungi[feast]'") from exc
    if hasattr(conn, "enable_load_extension"):
        conn.enable_load_extension(True)
        try:
            sqlite_vec.load(conn)
        finally:
            conn.enable_load_extension(False)
    if not _has_sqlite_vec(conn):
        raise RuntimeError(
            "cannot load sqlite-vec into this Python's sqlite3 (built without loadable extensions, and its SQLite "
            "library does not export sqlite3_auto_extension): use a Python built with "
            "--enable-loadable-sqlite-extensions (python.org, Debian/Ubuntu, conda and Docker builds are)"
        )


def register_sqlite_vec_auto_extension() -> bool:
    """Make every new sqlite3 connection of this process load sqlite-vec; False if impossible.

    For Pythons whose ``sqlite3`` lacks ``enable_load_extension``: the sqlite-vec shared
    library's entry point is registered with ``sqlite3_auto_extension`` of the SQLite
    library that ``_sqlite3`` is linked to (found through the module's own handle).
    """
    global _auto_extension_registered
    with _auto_extension_lock:
        if _auto_extension_registered:
            return True
        try:
            import _sqlite3

            import sqlite_vec

            candidates = sorted(glob.glob(sqlite_vec.loadable_path() + ".*"))
            if not candidates:
                return False
            library = ctypes.CDLL(_sqlite3.__file__)
            extension = ctypes.CDLL(candidates[0])
            entry = ctypes.cast(extension.sqlite3_vec_init, ctypes.c_void_p)
            library.sqlite3_auto_extension.argtypes = [ctypes.c_void_p]
            if library.sqlite3_auto_extension(entry) != 0:
                return False
        except (ImportError, OSError, AttributeError) as exc:
            logger.debug("sqlite-vec auto-extension not registered: %s", exc)
            return False
        _keep_loaded.extend([library, extension])
        _auto_extension_registered = True
        return True


def _entity_order(entity: EntityKeyProto) -> tuple:
    """The sort key Feast's ``_get_unique_entities_from_values`` uses."""
    return tuple(getattr(value, value.WhichOneof("val")) for value in entity.entity_values)


def _has_sqlite_vec(conn: sqlite3.Connection) -> bool:
    try:
        conn.execute("SELECT vec_version()").fetchone()
    except sqlite3.OperationalError:
        return False
    return True


def _vector_blob(value: ValueProto, length: int, what: str) -> bytes:
    kind = value.WhichOneof("val")
    if kind not in ("float_list_val", "double_list_val", "int32_list_val", "int64_list_val"):
        raise ValueError(f"{what} is indexed for vector search but holds {kind}, not a list of numbers")
    return _float32_blob(getattr(value, kind).val, length, what)


def _float32_blob(values: Sequence[float], length: int, what: str) -> bytes:
    array = np.asarray(values, dtype=np.float32)
    if array.ndim != 1 or (length and array.size != length):
        raise ValueError(f"{what} has {array.size} values; the field's vector_length is {length}")
    return array.tobytes()


def _aware(stamp: Union[datetime, None]) -> Optional[datetime]:
    if not isinstance(stamp, datetime):
        return None
    return stamp.astimezone(timezone.utc) if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)
