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
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fungi_ops.seeding import content_hash

from pipelines.formats.sources import read_batches
from pipelines.inputs import InputColumns, InputSchema
from pipelines.job.known_rows import KnownRows
from pipelines.layout import (
    CARRIED_DIR, CONTENT_HASH_COLUMN, ERROR_COLUMN, EVENT_TIME_COLUMN, EVENT_TIME_TYPE, ID_COLUMN, PAYLOAD_COLUMN,
    READ_STAGE, SOURCE_COLUMN, STAGE_COLUMN, carried_path,
)
from pipelines.storage import Location, write_whole

log = logging.getLogger(__name__)


def _read_block(
    table: pa.Table,
    *,
    source: str,
    first_row: int,
    columns: InputColumns,
    schema: InputSchema,
    event_time: datetime,
    known: KnownRows,
    retry_failed: bool,
    carried: list[tuple[pa.Array, pa.Array]],
) -> pa.Table:
    """Rows of one record batch to featurize (or to report), with the job's internal columns.

    A row whose id and content hash are those of a committed row is left out: unchanged in its
    own previous output, or appended to ``carried`` as ``(ids, donors)`` when another source's
    file holds it (the finalize task copies it from there). Only the hashing is per row in
    Python; the lookups are vectorized (:class:`~pipelines.job.known_rows.KnownRows`)."""
    keys = table.column(columns.id).combine_chunks().cast(pa.string())
    payloads = table.column(columns.data).combine_chunks()
    digests, errors = _content_hashes(payloads.to_pylist(), columns.data)
    times = table.column(columns.event_time).combine_chunks() if columns.event_time else None
    flagged = pc.or_(pc.is_null(keys), pc.is_null(payloads))
    if times is not None:
        flagged = pc.or_(flagged, pc.is_null(times))
    for row in np.flatnonzero(flagged.to_numpy(zero_copy_only=False)):
        if not keys[row].is_valid:
            errors[row] = f"row {first_row + row} of {source} has a null '{columns.id}'"
        elif not payloads[row].is_valid:
            errors[row] = f"'{columns.data}' is null"
        else:
            errors[row] = f"'{columns.event_time}' is null"
    digest_array = pa.array(digests, pa.string())
    old_digest, featurized, donor = known.lookup(keys)
    error_free = pa.array([e is None for e in errors], pa.bool_())
    same = pc.fill_null(pc.and_(pc.equal(old_digest, digest_array), error_free), False)  # null: not committed
    carry = pc.and_(same, pc.fill_null(pc.greater_equal(donor, 0), False))
    settled = pc.or_(pc.fill_null(featurized, False), pa.scalar(not retry_failed))  # featurized, or failed and not retried
    skip = pc.and_(pc.and_(same, pc.fill_null(pc.less(donor, 0), False)), settled)
    if pc.any(carry).as_py():
        carried.append((keys.filter(carry), donor.filter(carry)))
    keep = np.flatnonzero(~pc.or_(carry, skip).to_numpy(zero_copy_only=False))
    kept = table.take(pa.array(keep, pa.int64()))
    if columns.event_time:
        stamps = kept.column(columns.event_time).cast(schema.type_of(columns.event_time))
        if stamps.type.tz is None:
            stamps = pc.assume_timezone(stamps, "UTC")
        stamps = stamps.cast(EVENT_TIME_TYPE)
    else:
        stamps = pa.array([event_time] * len(keep), EVENT_TIME_TYPE)
    kept_errors = [errors[row] for row in keep]
    return pa.table(
        {
            ID_COLUMN: keys.take(pa.array(keep, pa.int64())),
            CONTENT_HASH_COLUMN: digest_array.take(pa.array(keep, pa.int64())),
            EVENT_TIME_COLUMN: stamps,
            **{name: kept.column(name).cast(schema.type_of(name)) for name in columns.keep},
            PAYLOAD_COLUMN: kept.column(columns.data).cast(schema.type_of(columns.data)),
            SOURCE_COLUMN: pa.array([source] * len(keep), pa.string()),
            ERROR_COLUMN: pa.array(kept_errors, pa.string()),
            STAGE_COLUMN: pa.array(["decode" if e else None for e in kept_errors], pa.string()),
        }
    )


def _content_hashes(payloads: list[Any], data_column: str) -> tuple[list[str | None], list[str | None]]:
    """Each payload's content hash (None for a null payload) and, by row, why it could not be hashed."""
    errors: list[str | None] = [None] * len(payloads)
    try:
        return [None if payload is None else content_hash(payload) for payload in payloads], errors
    except Exception:  # noqa: BLE001 - a row, not the job: find which
        digests: list[str | None] = []
        for row, payload in enumerate(payloads):
            try:
                digests.append(None if payload is None else content_hash(payload))
            except Exception as exc:  # noqa: BLE001
                digests.append(None)
                errors[row] = f"cannot hash the '{data_column}' value: {exc}"
        return digests, errors


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


class _Blocks:
    """Rows left to featurize, gathered into blocks of ``rows`` rows: after a compaction each record
    batch keeps only its few changed rows, and a block per batch would send thousands of 2-row
    blocks through decode, the actors, the staging writes and the finalize reads."""

    def __init__(self, rows: int) -> None:
        self.rows, self.held = rows, 0
        self.parts: list[pa.Table] = []

    def add(self, block: pa.Table) -> Iterator[pa.Table]:
        """Gather ``block``; yield the full blocks gathered."""
        if block.num_rows:
            self.parts.append(block)
            self.held += block.num_rows
        while self.held >= self.rows:
            table = pa.concat_tables(self.parts)
            yield table.slice(0, self.rows)
            rest = table.slice(self.rows)
            self.parts, self.held = ([rest] if rest.num_rows else []), rest.num_rows

    def rest(self) -> Iterator[pa.Table]:
        """The last, partial block."""
        if self.held:
            yield pa.concat_tables(self.parts)
        self.parts, self.held = [], 0


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

    Rows are yielded in blocks of ``rows_per_block`` (:class:`_Blocks`). Memory: about two
    blocks of rows, plus the (id, hash) pairs of
    the source's previous output and of its donor files (:class:`~pipelines.job.known_rows.KnownRows`).
    """
    fs = staging.filesystem()
    for item in items.to_pylist():
        source, donors = item["source"], item.get("donors") or []
        known = KnownRows.load(output, item["old_file"], item["old_error_file"], donors)
        carried: list[tuple[pa.Array, pa.Array]] = []
        pending = _Blocks(rows_per_block)
        first_row = 0
        try:
            input_file = pickle.loads(item["input"])
            for batch in read_batches(input_location, input_file, columns.names, rows_per_block):
                block = _read_block(
                    pa.Table.from_batches([batch]), source=source, first_row=first_row, columns=columns,
                    schema=schema, event_time=event_time, known=known, retry_failed=retry_failed, carried=carried,
                )
                first_row += batch.num_rows
                yield from pending.add(block)
            yield from pending.rest()
            if donors:
                indices = pa.chunked_array([index for _, index in carried], pa.int32())
                listed = pa.table({ID_COLUMN: pa.chunked_array([ids for ids, _ in carried], pa.string()),
                                   "file": pa.array(donors, pa.string()).take(indices)})
                fs.create_dir(staging.child_path(CARRIED_DIR), recursive=True)
                write_whole(fs, carried_path(staging, source), lambda target: pq.write_table(listed, target, filesystem=fs))
        except Exception as exc:  # noqa: BLE001 - a corrupt file fails alone, the job goes on
            log.warning("cannot read input file %s: %s", item["path"], exc)
            yield _read_failure(
                source, f"cannot read input file {source} at row {first_row}: {type(exc).__name__}: {exc}", columns, schema
            )
