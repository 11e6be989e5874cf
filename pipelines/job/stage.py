"""Stage 4 of the stream, staging: each block's rows, per source, into the run's staging area.

:func:`write_batch` writes a block's good rows and its error rows as files with
deterministic names (a retried task overwrites its file, never duplicates it), each whole
or not at all, and returns one stats row per source for the driver.
"""
from __future__ import annotations

import hashlib
import time
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.layout import (
    BLOCKS_DIR, CONTENT_HASH_COLUMN, ERROR_COLUMN, ERROR_SCHEMA, ERRORS_DIR, ID_COLUMN, INTERNAL_SUFFIX, SOURCE_COLUMN,
    STAGE_COLUMN, source_tag, spec_metadata,
)
from pipelines.storage import Location, write_whole


def _block_name(source: str, ids: Sequence[str | None]) -> str:
    """Deterministic file name from a block's source and ids: a retried task overwrites, never duplicates."""
    digest = hashlib.blake2b(source.encode("utf-8"), digest_size=10)
    for row_id in ids:
        digest.update(b"\x01" if row_id is None else row_id.encode("utf-8"))
        digest.update(b"\x00")
    return f"{source_tag(source)}-{digest.hexdigest()}{INTERNAL_SUFFIX}"



def rows_where(table: pa.Table, mask: pa.Array | pa.ChunkedArray) -> pa.Table:
    """The rows where ``mask`` is true: a zero-copy slice when they are consecutive, else a filtered copy.

    ``Table.filter`` copies every column, and a dense block's nested feature lists are most of
    its bytes (6 MiB a 512-px ViT-B image); a block's rows of one source are consecutive, and
    so are all of them when no row failed.
    """
    chosen = np.flatnonzero(pc.fill_null(mask, False).to_numpy(zero_copy_only=False))
    if len(chosen) == 0 or chosen[-1] - chosen[0] + 1 == len(chosen):
        return table.slice(int(chosen[0]) if len(chosen) else 0, len(chosen))
    return table.filter(mask)


def write_rows(table: pa.Table, path: str, fs: Any, *, dense: bool) -> None:
    """Write feature rows as one Parquet file: a dense table as :func:`fungi_ops.dense_table.write_dense_parquet`."""
    if dense:
        from fungi_ops.dense_table import write_dense_parquet

        write_dense_parquet(table, path, filesystem=fs)
    else:
        pq.write_table(table, path, filesystem=fs)


def write_batch(table: pa.Table, *, staging: Location, spec_json: str, spec_hash: str, dense: bool = False) -> pa.Table:
    """Write a block's good rows and error rows, per source, to staging; one stats row per source.

    Each file appears whole or not at all (:func:`pipelines.storage.write_whole`): a task
    killed mid-write (a lost node) leaves no truncated block for ``--history`` to keep.

    ``dense``: the rows hold a dense spec's per-patch features (see :func:`write_rows`).
    """
    fs = staging.filesystem()
    metadata = spec_metadata(spec_json, spec_hash)
    stats: dict[str, list] = {"source": [], "file": [], "rows": [], "error_file": [], "errors": [], "written_at": []}
    for source in pc.unique(table.column(SOURCE_COLUMN)).to_pylist():
        part = rows_where(table, pc.equal(table.column(SOURCE_COLUMN), source)).drop_columns([SOURCE_COLUMN])
        name = _block_name(source, part.column(ID_COLUMN).to_pylist())
        failed = pc.is_valid(part.column(ERROR_COLUMN))
        good = rows_where(part, pc.invert(failed)).drop_columns([ERROR_COLUMN, STAGE_COLUMN])
        bad = part.select([ID_COLUMN, CONTENT_HASH_COLUMN, STAGE_COLUMN, ERROR_COLUMN]).filter(failed)  # no feature copied
        row = {"source": source, "file": None, "rows": good.num_rows, "error_file": None, "errors": bad.num_rows}
        if good.num_rows:
            fs.create_dir(staging.child_path(BLOCKS_DIR), recursive=True)
            row["file"] = staging.child_path(BLOCKS_DIR, name)
            rows = good.replace_schema_metadata(metadata)
            write_whole(fs, row["file"], lambda target: write_rows(rows, target, fs, dense=dense))
        if bad.num_rows:
            row["error_file"] = staging.child_path(BLOCKS_DIR, ERRORS_DIR, name)
            errors = pa.table(
                [bad.column(ID_COLUMN), bad.column(CONTENT_HASH_COLUMN), bad.column(STAGE_COLUMN), bad.column(ERROR_COLUMN)],
                schema=ERROR_SCHEMA,
            )
            fs.create_dir(staging.child_path(BLOCKS_DIR, ERRORS_DIR), recursive=True)
            errors = errors.replace_schema_metadata(metadata)
            write_whole(fs, row["error_file"], lambda target: pq.write_table(errors, target, filesystem=fs))
        row["written_at"] = time.time()  # wall clock of the node: the job derives its steady rate from these
        for key, value in row.items():
            stats[key].append(value)
    return pa.table(stats, schema=pa.schema([
        ("source", pa.string()), ("file", pa.string()), ("rows", pa.int64()),
        ("error_file", pa.string()), ("errors", pa.int64()), ("written_at", pa.float64()),
    ]))
