"""Stage 5, after the stream: one finalize task per touched source turns its staged blocks into files.

:func:`finalize_source` merges a source's staged rows with its previous output file and the
rows it carries (read from the donors' committed files, every column as committed:
bit-identical features, never recomputed), dropping replaced, failed, moved and pruned rows,
into one new data file and one new error file in staging, and returns the source's new row
of the sources table. Output files of sources nobody touched are never opened. The decisions
take the ids alone (:class:`_SourceFinalizer`); a source's rows are then streamed into its
new file (:class:`_FinalFile`), never held: a dense source of 10,000 images holds 60 GB.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.formats.base import as_lists
from pipelines.formats.sources import read_columns
from pipelines.job.plan import NEW, SourceWork, read_moved_ids
from pipelines.job.stage import rows_where
from pipelines.layout import (
    CONTENT_HASH_COLUMN, ERROR_SCHEMA, ERRORS_DIR, FINAL_DIR, ID_COLUMN, READ_STAGE, data_file_name, error_file_name,
    staged_final_path,
)
from pipelines.storage import InputFile, Location, fsync_file


FINAL_BUFFER_BYTES = 256 << 20
"""Rows a finalize task gathers before writing them as a row group (dense tables: row groups of
``fungi_ops.dense_table.ROW_GROUP_BYTES``), so that its memory does not grow with the source."""


def _read_many(fs: Any, paths: Sequence[str], schema: pa.Schema | None = None) -> pa.Table | None:
    tables = [pq.read_table(path, filesystem=fs) for path in paths]
    if not tables:
        return None
    return pa.concat_tables(tables) if schema is None else pa.concat_tables([t.cast(schema) for t in tables])


def _first_rows(table: pa.Table) -> np.ndarray:
    """Bool mask of the first row of each id: a block written twice by a retried task counts once."""
    first = np.ones(table.num_rows, dtype=bool)
    if table.num_rows < 2 or pc.count_distinct(table.column(ID_COLUMN)).as_py() == table.num_rows:
        return first
    indexed = table.select([ID_COLUMN]).append_column("__row", pa.array(np.arange(table.num_rows)))
    first[:] = False
    first[indexed.group_by(ID_COLUMN).aggregate([("__row", "min")]).column("__row_min").to_numpy()] = True
    return first


def _first_per_id(table: pa.Table) -> pa.Table:
    """One row per id (the first), see :func:`_first_rows`."""
    return table.filter(pa.array(_first_rows(table)))


class _FinalFile:
    """A source's new data file, written part by part: memory holds one part and the rows gathered.

    A source's rows (its previous file, read a row group at a time, and its staged blocks)
    never sit in memory all at once: a dense source of 10,000 images at 512 px holds 60 GB
    of ViT-B features. Global features gather up to :data:`FINAL_BUFFER_BYTES` per row
    group, dense ones are written as :func:`~fungi_ops.dense_table.write_dense_parquet` does.
    """

    def __init__(self, fs: Any, path: str, metadata: dict[bytes, bytes], dense: bool, list_vectors: bool = False) -> None:
        self.fs, self.path, self.metadata, self.dense, self.list_vectors = fs, path, metadata, dense, list_vectors
        self.flush_bytes = FINAL_BUFFER_BYTES
        if dense:
            from fungi_ops.dense_table import ROW_GROUP_BYTES

            self.flush_bytes = ROW_GROUP_BYTES
        self.parts: list[pa.Table] = []
        self.buffered = 0
        self.writer: pq.ParquetWriter | None = None

    def write_file(self, path: str, keep: np.ndarray | None = None) -> None:
        """Append the rows of a Parquet file where ``keep`` (a bool per row; None: all) holds, row group by row group."""
        with self.fs.open_input_file(path) as handle:
            parquet, start = pq.ParquetFile(handle), 0
            for group in range(parquet.num_row_groups):
                rows = parquet.metadata.row_group(group).num_rows
                chosen = None if keep is None else keep[start : start + rows]
                start += rows
                if chosen is not None and not chosen.any():
                    continue
                table = parquet.read_row_group(group)
                self.write(table if chosen is None else rows_where(table, pa.array(chosen)))

    def write(self, table: pa.Table) -> None:
        """Append rows; they are written once :data:`FINAL_BUFFER_BYTES` (dense: a row group's worth) are gathered."""
        if table.num_rows:
            if self.list_vectors:
                table = as_lists(table)
            self.parts.append(table.replace_schema_metadata(self.metadata))
            self.buffered += table.nbytes
            if self.buffered >= self.flush_bytes:
                self._flush()

    def _flush(self) -> None:
        if not self.parts:
            return
        group = pa.concat_tables(self.parts)
        self.parts, self.buffered = [], 0
        row_group_size = None
        if self.dense:
            from fungi_ops.dense_table import dense_parquet_options, dense_row_group_rows

            row_group_size = dense_row_group_rows(group)
        if self.writer is None:
            options = dense_parquet_options(group.schema) if self.dense else {}
            self.writer = pq.ParquetWriter(self.path, group.schema, filesystem=self.fs, **options)
        self.writer.write_table(group, row_group_size=row_group_size)

    def close(self) -> None:
        """Write what is gathered, close the file and make it durable."""
        self._flush()
        if self.writer is not None:
            self.writer.close()
            fsync_file(self.fs, self.path)


def _ids_in(table: pa.Table | None, values: pa.Array) -> pa.Array:
    return pc.is_in(table.column(ID_COLUMN), value_set=values) if table is not None else pa.array([], pa.bool_())


def _count(mask: pa.Array) -> int:
    return int(pc.sum(mask).as_py() or 0) if len(mask) else 0


@dataclass
class FinalizeWork:
    """What one finalize task is given of its source: the night's plan for it and what the stream staged."""

    planned: SourceWork
    listed: bool  # the input listing has the file (else it is gone: --prune drops its rows)
    input_rows: int | None  # rows the input file holds now, when the night read it
    staged_files: list[str]  # the stream's staged blocks of its rows
    staged_error_files: list[str]  # ... and of its failed rows
    carried_file: str | None  # the read task's list of rows carried from donor files (pipelines.layout.carried_path)


FINALIZE_COUNTS = ("written", "carried", "replaced", "failed_new", "failed_known", "removed_failed", "deleted", "moved", "rewritten")


def finalize_source(
    work: FinalizeWork,
    *,
    input_location: Location,
    output: Location,
    staging: Location,
    id_column: str,
    id_type: pa.DataType,
    run_id: str,
    prune: bool,
    metadata: dict[bytes, bytes],
    dense: bool = False,
    data_name: str | None = None,
    list_vectors: bool = False,
) -> dict[str, Any]:
    """Ray task: a source's new data and error file (in staging) and its new sources-table row.

    ``work``: the source's plan (its kind, previous row, input file if listed, the ids that
    moved to other files) and its staged block files. Returns
    ``{"row": ..., "counts": {...}, "failed": message or None, "opened": names}``; a source
    that could not be read keeps its previous row (a new one: :func:`unreadable_source_row`). ``data_name`` is the name of its new data
    file (the output format's: :func:`data_file_name` with the run id for tables); ``list_vectors``: its
    vectors as ``list<float>`` (a table format's). The decisions take the ids alone
    (:class:`_SourceFinalizer`); the data file is then streamed (:class:`_FinalFile`;
    ``dense``: a dense table's layout).
    """
    step = _SourceFinalizer(work, output=output, prune=prune)
    failure = step.read_staged()
    if failure is not None:  # a new source's failure goes to _errors/; an old one keeps its row and features
        row = work.planned.old or unreadable_source_row(
            work.planned.input, failure, output=output, staging=staging,
            data_name=data_name or data_file_name(work.planned.source), metadata=metadata, run_id=run_id)
        return {"row": row, "counts": step.counts, "failed": failure, "opened": step.opened}
    step.decide(input_location, id_column)
    new_name = data_name or data_file_name(work.planned.source)
    data = step.write_data(new_name, staging, metadata, dense, list_vectors)
    errors = step.write_errors(new_name, staging, metadata)
    row = step.row(data, errors, id_type=id_type, run_id=run_id)
    return {"row": row, "counts": step.counts, "failed": None, "opened": step.opened}


def unreadable_source_row(info: InputFile, message: str, *, output: Location, staging: Location, data_name: str,
                          metadata: dict[bytes, bytes], run_id: str) -> dict[str, Any]:
    """The sources-table row of a new input file that could not be read at all (0 bytes, no footer), its
    error file staged: one ``_errors/`` row (null id, stage ``read``, the reason), where every failure is.

    Its identity is marked unreadable, so that the next night reads the file again (fixed, it is
    featurized and this row's failure dropped: a re-read source's null-id rows are reported anew).
    """
    error_name = f"{ERRORS_DIR}/{error_file_name(data_name)}"
    table = pa.table({ID_COLUMN: pa.nulls(1, pa.string()), CONTENT_HASH_COLUMN: pa.nulls(1, pa.string()),
                      "stage": [READ_STAGE], "error": [message]}, schema=ERROR_SCHEMA)
    _write_final(output.filesystem(), staging, error_name, table.replace_schema_metadata(metadata))
    return {
        "source": info.relpath, "size": info.size, "identity": f"unreadable:{info.identity}", "input_rows": 0,
        "file": None, "rows": 0, "error_file": error_name, "errors": 1, "id_min": None, "id_max": None,
        "orphans": 0, "present": True, "run_id": run_id,
    }


class _SourceFinalizer:
    """The steps of :func:`finalize_source` for one source, in order: read what the run staged,
    decide from the ids alone which old rows stay (and count why the others go), write the
    new data and error files, describe them in the source's new row."""

    def __init__(self, work: FinalizeWork, *, output: Location, prune: bool) -> None:
        self.work, self.output, self.prune = work, output, prune
        self.fs = output.filesystem()
        self.old = work.planned.old
        self.counts = dict.fromkeys(FINALIZE_COUNTS, 0)
        self.opened: set[str] = set()

    # -- 1. what the run staged ---------------------------------------------------------------
    def read_staged(self) -> str | None:
        """Read the staged ids and errors, one row per id (the first); the read error if the source failed."""
        fs = self.fs
        self.staged_ids = [pq.read_table(path, columns=[ID_COLUMN], filesystem=fs) for path in self.work.staged_files]
        self.staged_ok = pa.concat_tables(self.staged_ids) if self.staged_ids else None
        self.staged_err = _read_many(fs, self.work.staged_error_files, ERROR_SCHEMA)
        staged_err = self.staged_err
        if staged_err is not None and _count(pc.equal(staged_err.column("stage"), READ_STAGE)):
            return pc.filter(staged_err.column("error"), pc.equal(staged_err.column("stage"), READ_STAGE))[0].as_py()
        self.staged_keep = None
        if self.staged_ok is not None:
            self.staged_keep = _first_rows(self.staged_ok)
            self.staged_ok = self.staged_ok.filter(pa.array(self.staged_keep))
        if staged_err is not None:
            valid = staged_err.filter(pc.is_valid(staged_err.column(ID_COLUMN)))
            self.staged_err = pa.concat_tables(
                [_first_per_id(valid), staged_err.filter(pc.is_null(staged_err.column(ID_COLUMN)))]
            )
        carried = self.work.carried_file
        self.carried = pq.read_table(carried, filesystem=fs) if carried else None
        if self.carried is not None and not self.carried.num_rows:
            self.carried = None
        return None

    # -- 2. the decisions, on ids -------------------------------------------------------------
    def decide(self, input_location: Location, id_column: str) -> None:
        """Which previous rows stay (``keep_ok_mask``, ``keep_err_mask``), and the counts."""
        work, staged_ok, staged_err = self.work, self.staged_ok, self.staged_err
        self.touched = pa.concat_arrays(
            [t.column(ID_COLUMN).combine_chunks() for t in (staged_ok, staged_err, self.carried) if t is not None]
            or [pa.array([], pa.string())]
        ).drop_null()
        self.moved = read_moved_ids(work.planned.moved_ids)
        # the input file's ids now, when a night needs them; a new source has no previous rows to prune
        # or call orphans (its rows all came from the file), so its file is not read a second time
        self.current = None
        if work.planned.input and work.planned.kind != NEW:
            ids = read_columns(input_location, work.planned.input, [id_column]).column(0)
            self.current = ids.cast(pa.string()).combine_chunks().drop_null()
        self.old_ids = self._previous(self.old and self.old["file"], [ID_COLUMN])
        self.old_err = self._previous(self.old and self.old["error_file"])
        if self.old_err is not None:
            self.old_err = self.old_err.cast(ERROR_SCHEMA)
        self.keep_ok_mask = pc.invert(self._drop_mask(self.old_ids)) if self.old_ids is not None else None
        self.keep_err_mask = pc.invert(self._drop_mask(self.old_err)) if self.old_err is not None else None
        self._count_replaced_and_failed()
        self._count_moved_and_deleted()
        self.counts["written"] = staged_ok.num_rows if staged_ok is not None else 0
        self.counts["carried"] = self.carried.num_rows if self.carried is not None else 0

    def _previous(self, name: str | None, columns: list[str] | None = None) -> pa.Table | None:
        if not name:
            return None
        self.opened.add(name)
        return pq.read_table(self.output.child_path(name), columns=columns, filesystem=self.fs)

    def _drop_mask(self, table: pa.Table) -> pa.Array:
        """The previous rows that go: re-featurized or failed now, moved, deleted (--prune)."""
        mask = pc.or_(_ids_in(table, self.touched), _ids_in(table, self.moved))
        if self.prune and self.current is not None:
            mask = pc.or_(mask, pc.invert(_ids_in(table, self.current)))
        elif self.prune and not self.work.listed:
            mask = pa.array(np.ones(table.num_rows, dtype=bool))
        if self.work.planned.reads_payloads:  # the source was re-read: its null-id rows were reported again
            mask = pc.or_(mask, pc.is_null(table.column(ID_COLUMN)))
        return pc.fill_null(mask, True)

    def _count_replaced_and_failed(self) -> None:
        counts, staged_ok, staged_err = self.counts, self.staged_ok, self.staged_err
        if self.old_ids is not None:
            known_ok = self.old_ids.column(ID_COLUMN)
            counts["replaced"] = _count(_ids_in(staged_ok, known_ok)) if staged_ok is not None else 0
            counts["removed_failed"] = (
                _count(pc.is_in(staged_err.column(ID_COLUMN), value_set=known_ok)) if staged_err is not None else 0
            )
            counts["replaced"] += counts["removed_failed"]
        if staged_err is not None:  # a failure already recorded with the same payload is not new
            before = self.old_err if self.old_err is not None else ERROR_SCHEMA.empty_table()
            known = _count(pc.is_in(_error_keys(staged_err), value_set=_error_keys(before).combine_chunks()))
            counts["failed_known"], counts["failed_new"] = known, staged_err.num_rows - known

    def _count_moved_and_deleted(self) -> None:
        for table, mask in ((self.old_ids, self.keep_ok_mask), (self.old_err, self.keep_err_mask)):
            if table is None:
                continue
            dropped = pc.invert(mask)
            self.counts["moved"] += _count(pc.and_(dropped, _ids_in(table, self.moved)))
            if self.prune and (self.current is not None or not self.work.listed):
                gone = pc.invert(_ids_in(table, self.current)) if self.current is not None else dropped
                stayed = pc.or_(_ids_in(table, self.touched), _ids_in(table, self.moved))  # written again here or elsewhere
                self.counts["deleted"] += _count(pc.and_(pc.and_(dropped, gone), pc.invert(stayed)))

    # -- 3. the files -------------------------------------------------------------------------
    def write_data(self, new_name: str, staging: Location, metadata: dict[bytes, bytes], dense: bool,
                   list_vectors: bool) -> tuple[str | None, pa.ChunkedArray | None]:
        """(name, ids) of the source's data file: the old one when untouched, else a new one streamed from
        the kept old rows, the rows carried from donor files (every column as committed) and the staged
        blocks; (None, None) when no row is left."""
        old, old_ids, keep = self.old, self.old_ids, self.keep_ok_mask
        if old_ids is not None and _count(pc.invert(keep)) == 0 and self.staged_ok is None and self.carried is None:
            return old["file"], old_ids.column(ID_COLUMN)  # untouched: the old file stays
        kept_old = old_ids is not None and _count(keep) > 0
        donors = self._donor_rows()
        if not (kept_old or donors or self.counts["written"]):
            return None, None
        parts = [old_ids.filter(keep)] if kept_old else []
        parts += [ids.filter(mask) for _, ids, mask in donors]
        data_ids = pa.concat_tables([*parts, *([self.staged_ok] if self.counts["written"] else [])]).column(ID_COLUMN)
        path = staged_final_path(staging, new_name)
        self.fs.create_dir(posixpath.dirname(path), recursive=True)
        final = _FinalFile(self.fs, path, metadata, dense, list_vectors)
        if kept_old:
            final.write_file(self.output.child_path(old["file"]), pc.fill_null(keep, False).to_numpy(zero_copy_only=False))
        for name, _, mask in donors:
            final.write_file(self.output.child_path(name), mask.to_numpy(zero_copy_only=False))
        offsets = np.cumsum([0, *(t.num_rows for t in self.staged_ids)])
        for index, staged in enumerate(self.work.staged_files):
            final.write_file(staged, self.staged_keep[offsets[index] : offsets[index + 1]])
        final.close()
        self.counts["rewritten"] += 1
        return new_name, data_ids

    def _donor_rows(self) -> list[tuple[str, pa.Table, pa.Array]]:
        """(file, its ids, the rows carried from it) of each donor file the read task carried rows from."""
        if self.carried is None:
            return []
        donors = []
        for name in pc.unique(self.carried.column("file")).to_pylist():
            wanted = self.carried.filter(pc.equal(self.carried.column("file"), name)).column(ID_COLUMN)
            ids = self._previous(name, [ID_COLUMN])
            mask = pc.fill_null(pc.is_in(ids.column(ID_COLUMN), value_set=wanted.combine_chunks()), False)
            donors.append((name, ids, mask))
        return donors

    def write_errors(self, new_name: str, staging: Location,
                     metadata: dict[bytes, bytes]) -> tuple[str | None, pa.ChunkedArray | None]:
        """(name, ids) of the source's error file, as :meth:`write_data` for the data file."""
        old_err, keep = self.old_err, self.keep_err_mask
        if old_err is not None and _count(pc.invert(keep)) == 0 and self.staged_err is None:
            return self.old["error_file"], old_err.column(ID_COLUMN)
        kept = old_err.filter(keep) if old_err is not None else None
        parts = [t for t in (kept, self.staged_err) if t is not None and t.num_rows]
        if not parts:
            return None, None
        table = pa.concat_tables([p.cast(ERROR_SCHEMA) for p in parts]).replace_schema_metadata(metadata)
        error_name = f"{ERRORS_DIR}/{error_file_name(new_name)}"
        _write_final(self.fs, staging, error_name, table)
        self.counts["rewritten"] += 1
        return error_name, table.column(ID_COLUMN)

    # -- 4. the source's row ------------------------------------------------------------------
    def row(self, data: tuple[str | None, pa.ChunkedArray | None], errors: tuple[str | None, pa.ChunkedArray | None],
            *, id_type: pa.DataType, run_id: str) -> dict[str, Any]:
        """The source's new sources-table row: its files, counts, id range and orphans."""
        (data_name, data_ids), (error_name, error_ids) = data, errors
        work, old = self.work, self.old or {}
        all_ids = pa.chunked_array(
            [c for ids in (data_ids, error_ids) if ids is not None for c in ids.chunks], pa.string()
        ).combine_chunks().drop_null()
        typed = all_ids.cast(id_type)
        bounds = pc.min_max(typed) if len(typed) else None
        if self.current is not None:  # rows whose id the input file no longer has (kept without --prune)
            orphans = _count(pc.invert(pc.is_in(all_ids, value_set=self.current)))
        elif not work.listed:
            orphans = len(all_ids)
        else:
            orphans = old.get("orphans") or 0
        listed = work.planned.input
        return {
            "source": work.planned.source,
            "size": listed.size if listed else old.get("size"),
            "identity": listed.identity if listed else old.get("identity"),
            "input_rows": work.input_rows if work.input_rows is not None else old.get("input_rows", 0),
            "file": data_name,
            "rows": len(data_ids) if data_ids is not None else 0,
            "error_file": error_name,
            "errors": len(error_ids) if error_ids is not None else 0,
            "id_min": bounds["min"].as_py() if bounds else None,
            "id_max": bounds["max"].as_py() if bounds else None,
            "orphans": orphans,
            "present": work.listed,
            "run_id": run_id if self.counts["rewritten"] else old.get("run_id", run_id),
        }


def _error_keys(errors: pa.Table) -> pa.ChunkedArray:
    """``id`` and payload hash of each error row, joined: the same failure of the same input."""
    return pc.binary_join_element_wise(
        pc.fill_null(errors.column(ID_COLUMN), ""), pc.fill_null(errors.column(CONTENT_HASH_COLUMN), ""), "\x00"
    )


def _write_final(fs: Any, staging: Location, name: str, table: pa.Table) -> None:
    path = staged_final_path(staging, name)
    fs.create_dir(staging.child_path(FINAL_DIR, ERRORS_DIR), recursive=True)
    pq.write_table(table, path, filesystem=fs)
    fsync_file(fs, path)
