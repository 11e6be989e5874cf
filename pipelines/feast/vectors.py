"""The FUNGI concatenation as a vector Feast can index, and its mirror in the repository.

Feast's SQLite store indexes one field per feature view and searches stored columns only, so
``fungi feast`` writes each data file's FUNGI vectors (:func:`fungi_vectors`) as Parquet under
the repository (:func:`sync_fungi_vectors`), refreshed when a data file is new or changed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.feast.output import FeatureOutput
from pipelines.formats.base import restore_vectors
from pipelines.layout import EVENT_TIME_COLUMN, ID_COLUMN

FUNGI_FEATURE = "fungi"


def fungi_vectors(table: pa.Table | pa.RecordBatch, columns: Sequence[str]) -> np.ndarray:
    """The FUNGI concatenation, float32 ``(rows, sum of dims)``, unit norm.

    Each block is L2-normalised, the blocks are concatenated in ``columns`` order and the
    result is divided by sqrt(number of blocks): cosine on it is the mean of the blocks'
    cosines, the comparison ``fungi eval`` and the paper make.
    """
    blocks = []
    for name in columns:
        block = vector_matrix(table.column(name))
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        blocks.append(block / np.maximum(norms, 1e-12))
    if not blocks:
        raise ValueError("no feature column to concatenate")
    return (np.concatenate(blocks, axis=1) / np.sqrt(len(blocks))).astype(np.float32)


def vector_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A ``fixed_size_list<float32>`` column as a float32 ``(rows, dim)`` array; ValueError on a null vector."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        raise ValueError(f"{column.null_count} null vector(s)")
    size = column.type.list_size
    return np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(column), size)


def sync_fungi_vectors(source: FeatureOutput, mirror: Path) -> tuple[int, int]:
    """Write the FUNGI concatenation of each source file that is new or changed; drop the rest."""
    index_path = mirror / "_sources.json"
    key = {"columns": source.vector_columns, "source": source.source_path}
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    if {k: index.get(k) for k in key} != key:
        shutil.rmtree(mirror, ignore_errors=True)
        index = {}
    mirror.mkdir(parents=True, exist_ok=True)
    known: dict[str, list] = dict(index.get("files", {}))
    files: dict[str, list] = {}
    fs = source.filesystem()
    written = 0
    for info in source.source_files:
        stamp = [info.size, info.mtime_ns]
        files[info.base_name] = stamp
        if known.get(info.base_name) == stamp and (mirror / info.base_name).exists():
            continue
        _write_fungi_file(fs, info.path, mirror / info.base_name, {c: source.dim(c) for c in source.vector_columns})
        written += 1
    for path in mirror.glob("*.parquet"):
        if path.name not in files:
            path.unlink()
    temporary = index_path.with_suffix(".tmp")
    temporary.write_text(json.dumps({**key, "files": files}, indent=1, sort_keys=True))
    temporary.replace(index_path)
    return written, len(files) - written


def _write_fungi_file(fs: pafs.FileSystem, path: str, target: Path, dims: dict[str, int]) -> None:
    """``id``, ``event_time`` and the FUNGI concatenation of the vector columns ``dims`` (name: dimension,
    in order) of one source file, written atomically; a table's ``list<float>`` vectors are read as fixed-size.

    The temporary name starts with '.', which Feast's file offline store skips.
    """
    temporary = target.with_name(f".{target.name}.tmp")
    columns, dim = list(dims), sum(dims.values())
    with fs.open_input_file(path) as handle:
        parquet = pq.ParquetFile(handle)
        source = parquet.schema_arrow
        schema = pa.schema([source.field(ID_COLUMN), source.field(EVENT_TIME_COLUMN),
                            pa.field(FUNGI_FEATURE, pa.list_(pa.float32(), dim))])
        with pq.ParquetWriter(temporary, schema) as writer:
            for batch in parquet.iter_batches(batch_size=8192, columns=[ID_COLUMN, EVENT_TIME_COLUMN, *columns]):
                batch = restore_vectors(pa.Table.from_batches([batch]), dims)
                vectors = pa.FixedSizeListArray.from_arrays(pa.array(fungi_vectors(batch, columns).reshape(-1)), dim)
                writer.write_table(pa.Table.from_arrays(
                    [batch.column(ID_COLUMN), batch.column(EVENT_TIME_COLUMN), vectors], schema=schema
                ))
    temporary.replace(target)
