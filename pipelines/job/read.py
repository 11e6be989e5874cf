"""Stage 1 of the stream, reading: one task per input file streams its rows that need features.

:func:`read_sources` streams a file's row groups (a table's deletes applied,
:func:`pipelines.formats.sources.read_batches`), hashes each payload, and drops the
rows whose id and content hash are those of a committed row: in the file's own previous
output (and rows that failed before with the same content, unless ``--retry-failed``), or in
a **donor**, the committed data file of another source that held its id
(:mod:`pipelines.job.plan`: the files a rewrite, rename or compaction replaced). Rows found
unchanged in a donor are listed as **carried** (:func:`pipelines.layout.carried_path`) for
the finalize task to copy. A row that cannot be featurized (null id, null payload) flows on
with its error; a file that cannot be read yields one ``read`` error row and fails alone.
"""
from __future__ import annotations

import logging
import pickle
from datetime import datetime
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fungi_ops.seeding import content_hash

from pipelines.formats.sources import read_batches
from pipelines.inputs import InputColumns, InputSchema
from pipelines.layout import (
    CARRIED_DIR, CONTENT_HASH_COLUMN, ERROR_COLUMN, EVENT_TIME_COLUMN, EVENT_TIME_TYPE, ID_COLUMN, PAYLOAD_COLUMN,
    READ_STAGE, SOURCE_COLUMN, STAGE_COLUMN, carried_path,
)
from pipelines.storage import Location, write_whole

log = logging.getLogger(__name__)


def _known_rows(output: Location, data_file: str | None, error_file: str | None,
                donors: Sequence[str] = ()) -> dict[str, tuple[str, bool, int]]:
    """id -> (content hash, featurized, donor) of the rows committed for a source: its previous
    output (its data and error file; donor -1) and the data files of other sources that held
    some of its ids (``donors``; donor: the index of the file), from which its unchanged rows
    are carried."""
    fs = output.filesystem()
    known: dict[str, tuple[str, bool, int]] = {}
    named = [*((name, True, index) for index, name in enumerate(donors)), (error_file, False, -1), (data_file, True, -1)]
    for name, ok, donor in named:
        if name:
            table = pq.read_table(output.child_path(name), columns=[ID_COLUMN, CONTENT_HASH_COLUMN], filesystem=fs)
            for row_id, digest in zip(table.column(0).to_pylist(), table.column(1).to_pylist()):
                if row_id is not None:
                    known[row_id] = (digest, ok, donor)
    return known


def _read_block(
    table: pa.Table,
    *,
    source: str,
    first_row: int,
    columns: InputColumns,
    schema: InputSchema,
    event_time: datetime,
    known: dict[str, tuple[str, bool, int]],
    retry_failed: bool,
    carried: list[tuple[str, int]],
) -> pa.Table:
    """Rows of one record batch to featurize (or to report), with the job's internal columns.

    A row whose id and content hash are those of a committed row is left out: unchanged in its
    own previous output, or appended to ``carried`` as ``(id, donor)`` when another source's
    file holds it (the finalize task copies it from there)."""
    ids = table.column(columns.id).to_pylist()
    payloads = table.column(columns.data).to_pylist()
    times = table.column(columns.event_time).to_pylist() if columns.event_time else None
    keep, out_ids, hashes, errors = [], [], [], []
    for row, (row_id, payload) in enumerate(zip(ids, payloads)):
        key = None if row_id is None else str(row_id)
        digest, error = None, None
        if payload is not None:
            try:
                digest = content_hash(payload)
            except Exception as exc:  # noqa: BLE001 - a row, not the job
                error = f"cannot hash the '{columns.data}' value: {exc}"
        if key is None:
            error = f"row {first_row + row} of {source} has a null '{columns.id}'"
        elif payload is None:
            error = f"'{columns.data}' is null"
        elif times is not None and times[row] is None:
            error = f"'{columns.event_time}' is null"
        if error is None and key in known:
            old_digest, featurized, donor = known[key]
            if old_digest == digest and donor >= 0:
                carried.append((key, donor))
                continue
            if old_digest == digest and (featurized or not retry_failed):
                continue
        keep.append(row)
        out_ids.append(key)
        hashes.append(digest)
        errors.append(error)
    kept = table.take(pa.array(keep, pa.int64()))
    if columns.event_time:
        stamps = kept.column(columns.event_time).cast(schema.type_of(columns.event_time))
        if stamps.type.tz is None:
            stamps = pc.assume_timezone(stamps, "UTC")
        stamps = stamps.cast(EVENT_TIME_TYPE)
    else:
        stamps = pa.array([event_time] * len(keep), EVENT_TIME_TYPE)
    return pa.table(
        {
            ID_COLUMN: pa.array(out_ids, pa.string()),
            CONTENT_HASH_COLUMN: pa.array(hashes, pa.string()),
            EVENT_TIME_COLUMN: stamps,
            **{name: kept.column(name).cast(schema.type_of(name)) for name in columns.keep},
            PAYLOAD_COLUMN: kept.column(columns.data).cast(schema.type_of(columns.data)),
            SOURCE_COLUMN: pa.array([source] * len(keep), pa.string()),
            ERROR_COLUMN: pa.array(errors, pa.string()),
            STAGE_COLUMN: pa.array(["decode" if e else None for e in errors], pa.string()),
        }
    )


def _read_failure(source: str, message: str, columns: InputColumns, schema: InputSchema) -> pa.Table:
    """The one row that tells the commit a source could not be read."""
    return pa.table(
        {
            ID_COLUMN: pa.nulls(1, pa.string()),
            CONTENT_HASH_COLUMN: pa.nulls(1, pa.string()),
            EVENT_TIME_COLUMN: pa.nulls(1, EVENT_TIME_TYPE),
            **{name: pa.nulls(1, schema.type_of(name)) for name in columns.keep},
            PAYLOAD_COLUMN: pa.nulls(1, schema.type_of(columns.data)),
            SOURCE_COLUMN: pa.array([source]),
            ERROR_COLUMN: pa.array([message]),
            STAGE_COLUMN: pa.array([READ_STAGE]),
        }
    )


def read_sources(
    items: pa.Table,
    *,
    input_location: Location,
    output: Location,
    columns: InputColumns,
    schema: InputSchema,
    event_time: datetime,
    rows_per_block: int,
    retry_failed: bool,
    staging: Location,
) -> Iterator[pa.Table]:
    """Ray Data generator UDF over the sources to read (``source``, ``path``, the pickled
    :class:`~pipelines.storage.InputFile`, previous files, donor files): each source's live rows
    (:func:`~pipelines.formats.sources.read_batches`: a table's deletes applied) whose id
    or content is new. The rows it carries from donor files are listed at :func:`carried_path`
    once the file is read whole (a retried task writes the same list again).

    Memory: one record batch of ``rows_per_block`` rows, plus the (id, hash) pairs of
    the source's previous output and of its donor files.
    """
    fs = staging.filesystem()
    for item in items.to_pylist():
        source, donors = item["source"], item.get("donors") or []
        known = _known_rows(output, item["old_file"], item["old_error_file"], donors)
        carried: list[tuple[str, int]] = []
        first_row = 0
        try:
            input_file = pickle.loads(item["input"])
            for batch in read_batches(input_location, input_file, columns.names, rows_per_block):
                block = _read_block(
                    pa.Table.from_batches([batch]), source=source, first_row=first_row, columns=columns,
                    schema=schema, event_time=event_time, known=known, retry_failed=retry_failed, carried=carried,
                )
                first_row += batch.num_rows
                if block.num_rows:
                    yield block
            if donors:
                listed = pa.table({ID_COLUMN: pa.array([key for key, _ in carried], pa.string()),
                                   "file": pa.array([donors[index] for _, index in carried], pa.string())})
                fs.create_dir(staging.child_path(CARRIED_DIR), recursive=True)
                write_whole(fs, carried_path(staging, source), lambda target: pq.write_table(listed, target, filesystem=fs))
        except Exception as exc:  # noqa: BLE001 - a corrupt file fails alone, the job goes on
            log.warning("cannot read input file %s: %s", item["path"], exc)
            yield _read_failure(
                source, f"cannot read input file {source} at row {first_row}: {type(exc).__name__}: {exc}", columns, schema
            )
