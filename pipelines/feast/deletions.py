"""The ids a FUNGI output no longer holds, removed from the Feast online store that served them.

Feast's materialization only writes: an id that ``fungi featurize --prune`` deleted from the
output (its input file gone, or the id gone from a changed file), or whose row now fails,
would be served by ``get_online_features`` and found by vector search forever. ``fungi
feast`` therefore finds those ids and deletes their rows from the online store.

Finding them costs the rows that changed, not the table. The repository keeps, per output,
the ids of each committed data file it has seen, under ``data/served/<name>/``:

* ``ids/<file>-<size>-<mtime>.parquet``: the ``id`` column of one data file as it was then;
* ``files.json``: the data files of the output at the last ``fungi feast`` (name and stamp),
  written last: the commit point (a killed run leaves the previous state, and the files of
  the previous stamps are still there);
* ``pending.parquet``: the ids found deleted, with when, removed from the online store by
  every run for :data:`KEEP_DELETED` (a ``feast materialize START END`` whose window holds an
  id's last version pushes it again; the next ``fungi feast`` removes it again).

A night's deleted ids are the kept ids of the data files gone or changed since, less the
ids of the data files new or changed (an id that moved to another file, or that was
rewritten, is not deleted). Only those files' id columns are read. The first ``fungi feast``
of an output has no kept ids: it reads every data file's ids once, and takes as deleted the
ids of the row versions the Feast source holds (a table's kept versions, a folder's
``--history``) that no current file holds, which a first materialization would push.

Removal (:func:`remove_deleted_ids`) deletes the rows of the pending ids from the online
tables of every feature view of the output's entity (Feast's SQLite store, and
:class:`pipelines.feast.online_store.FungiSqliteOnlineStore`, whose vector search scans those same
tables: a removed id is found by neither). An id stays pending at least until every view of
the output has been materialized once, since a first materialization of a ``--history``
source pushes every id it holds.
"""
from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.layout import ID_COLUMN

if TYPE_CHECKING:
    from pipelines.feast.output import FeatureOutput

SERVED_DIR = Path("data") / "served"
FILES_NAME = "files.json"
PENDING_NAME = "pending.parquet"
IDS_DIR = "ids"
DELETED_AT = "deleted_at"
KEEP_DELETED = timedelta(days=7)  # how long a deleted id is removed again by every run


def served_folder(repo: Path, name: str) -> Path:
    """Where the repository keeps what it served of the output ``name``."""
    return repo / SERVED_DIR / name


def track_deletions(source: "FeatureOutput", folder: Path) -> int:
    """Record the output's current data files under ``folder``; add the ids they no longer hold to the
    pending ones. Returns the number of ids found deleted by this call."""
    files_path, ids_dir = folder / FILES_NAME, folder / IDS_DIR
    index = json.loads(files_path.read_text()) if files_path.exists() else None
    if index is not None and index.get("output") != source.root:  # another output under this name
        shutil.rmtree(folder)
        index = None
    ids_dir.mkdir(parents=True, exist_ok=True)
    fs = source.filesystem()
    current = {info.base_name: info for info in source.data_files}
    stamps = {name: _stamp(info) for name, info in current.items()}
    known: dict[str, str] = dict(index["files"]) if index else {}
    fresh = [name for name, stamp in stamps.items() if known.get(name) != stamp]
    new_ids = []
    for name in fresh:
        ids = _read_ids(fs, current[name].path)
        pq.write_table(pa.table({ID_COLUMN: ids}), ids_dir / f"{stamps[name]}.parquet")
        new_ids.append(ids)
    if index is None:  # the row versions a first materialization would push, that no current file holds
        data_paths = {info.path for info in source.data_files}
        old_ids = [_read_ids(fs, info.path) for info in source.source_files if info.path not in data_paths]
    else:
        old_ids = [pq.read_table(ids_dir / f"{stamp}.parquet").column(ID_COLUMN).combine_chunks()
                   for name, stamp in known.items() if stamps.get(name) != stamp]
    added = _concat(new_ids)
    deleted = _minus(_concat(old_ids), added)
    pending = read_pending(folder)
    pending = pending.filter(pc.invert(pc.is_in(pending[ID_COLUMN], value_set=added)))
    pending = pending.filter(pc.invert(pc.is_in(pending[ID_COLUMN], value_set=deleted)))
    now = pa.array([datetime.now(timezone.utc)] * len(deleted), pa.timestamp("us", tz="UTC"))
    _write_pending(folder, pa.concat_tables([pending, pa.table({ID_COLUMN: deleted, DELETED_AT: now})]))
    temporary = files_path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"output": source.root, "files": stamps}, indent=1, sort_keys=True))
    temporary.replace(files_path)
    for path in ids_dir.glob("*.parquet"):
        if path.stem not in set(stamps.values()):
            path.unlink()
    return len(deleted)


def read_pending(folder: Path) -> pa.Table:
    """The ids found deleted (``id``, ``deleted_at``) that runs remove from the online store."""
    path = folder / PENDING_NAME
    if not path.exists():
        return pa.table({ID_COLUMN: pa.array([], pa.string()), DELETED_AT: pa.array([], pa.timestamp("us", tz="UTC"))})
    return pq.read_table(path)


def remove_deleted_ids(repo: Path, entity: str, folder: Path) -> tuple[int, int, str | None]:
    """Delete the pending ids' rows from the online tables of the feature views of ``entity``.

    Returns (ids that had rows there, ids waiting for a view's first materialization, a note or
    None). Nothing is done before ``feast apply`` has registered the views. Ids found deleted
    more than :data:`KEEP_DELETED` ago are forgotten once every view has been materialized.
    """
    pending = read_pending(folder)
    if not pending.num_rows:
        return 0, 0, None
    from feast import FeatureStore
    from feast.infra.online_stores.sqlite import SqliteOnlineStore

    from pipelines.feast.online_store import delete_entities

    store = FeatureStore(repo_path=str(repo))
    views = [view for view in store.list_feature_views() if entity in view.entities]
    if not views:
        return 0, pending.num_rows, None
    online = store._get_provider().online_store
    if not isinstance(online, SqliteOnlineStore):
        return 0, pending.num_rows, (
            f"{pending.num_rows} id(s) deleted from the output may still be in the online store "
            f"({type(online).__name__}): fungi feast removes them from a SQLite online store only; their list is "
            f"{folder / PENDING_NAME}"
        )
    removed = delete_entities(online, store.config, views, ID_COLUMN, pending[ID_COLUMN].to_pylist())
    if not all(view.materialization_intervals for view in views):
        return removed, pending.num_rows, None
    cutoff = pa.scalar(datetime.now(timezone.utc) - KEEP_DELETED, pa.timestamp("us", tz="UTC"))
    _write_pending(folder, pending.filter(pc.greater(pending[DELETED_AT], cutoff)))
    return removed, 0, None


# --- internals ---------------------------------------------------------------------------


def _stamp(info: pafs.FileInfo) -> str:
    """A data file's name with its size and modification time: another stamp is another content."""
    return f"{info.base_name}-{info.size}-{info.mtime_ns}"


def _read_ids(fs: pafs.FileSystem, path: str) -> pa.Array:
    """The ``id`` column of one data file, as strings (Feast's entity values)."""
    with fs.open_input_file(path) as handle:
        column = pq.read_table(handle, columns=[ID_COLUMN]).column(ID_COLUMN)
    return column.cast(pa.string()).combine_chunks()


def _concat(arrays: Iterable[pa.Array]) -> pa.Array:
    arrays = [a.cast(pa.string()) for a in arrays]
    return pa.concat_arrays(arrays) if arrays else pa.array([], pa.string())


def _minus(ids: pa.Array, other: pa.Array) -> pa.Array:
    """The distinct ``ids`` that are not in ``other``."""
    return pc.unique(ids.filter(pc.invert(pc.is_in(ids, value_set=other)))) if len(ids) else ids


def _write_pending(folder: Path, pending: pa.Table) -> None:
    path = folder / PENDING_NAME
    if not pending.num_rows:
        path.unlink(missing_ok=True)
        return
    temporary = path.with_name(f".{PENDING_NAME}.tmp")
    pq.write_table(pending, temporary)
    temporary.replace(path)
