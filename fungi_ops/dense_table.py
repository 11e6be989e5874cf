"""The dense output schema: one Parquet row per image, its patch features as nested lists.

========================  =================================================================
column                    type
========================  =================================================================
``id``                    string, the input id
``content_hash``          string (written by the pipeline, as for global features)
kept columns              as in the input (e.g. the label mask's PNG bytes)
``grid_rows``             int32, rows of the patch grid
``grid_cols``             int32, columns of the patch grid
``embedding``             ``List<FixedSizeList<float32>[embed_dim]>``, one entry per patch
``grad_dense``            ``List<FixedSizeList<float32>[projection_dim]>``, one entry per patch
========================  =================================================================

Patches are in row-major order of the grid (``grid_rows * grid_cols`` entries), each
vector L2-normalised; file metadata ``fungi.spec`` / ``fungi.spec_hash`` as for global features.

Why one row per image and not one per patch: the pipeline's guarantees (one output row
per input row, ``_errors/`` quarantine, exactly-once commit, ``--incremental`` by id and
content hash) stay those of the global features, and per-image columns (ids, hashes, a
mask of ~10-100 kB) are stored once instead of once per patch (1,024 times at 512 px).
A memory bank needs no per-patch rows either: :class:`~fungi_ops.eval.dense_io.DenseReader`
(re-exported here) hands out each batch's
patches as one ``[patches, dim]`` matrix (``flatten`` of the nested column, no copy) with
per-image offsets.

Writing: nested lists are built over the feature arrays without copying them
(:func:`patch_feature_array`), and :func:`write_dense_parquet` writes row groups of about
:data:`ROW_GROUP_BYTES`, plain-encoded and uncompressed (random floats neither
dictionary-encode nor compress: pyarrow's defaults wrote a 32-image 1,024 x 768 x 2-column
file 1.6 times larger and 10 times slower, 5.6 s against 0.58 s, measured). The peak memory
of writing is one row group above the arrays themselves (see ``benchmarks/bench_dense.py``).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fungi_ops.eval.dense_io import DENSE_FEATURES, GRID_COLUMNS, DenseReader, DenseRows
from fungi_ops.file_keys import ID_COLUMN, SPEC_HASH_KEY, SPEC_KEY

if TYPE_CHECKING:
    import pyarrow.fs as pafs

    from fungi_ops.dense import DenseBatch
    from fungi_ops.spec import FeaturizerSpec

__all__ = [
    "DENSE_FEATURES",
    "GRID_COLUMNS",
    "ROW_GROUP_BYTES",
    "DenseReader",
    "DenseRows",
    "dense_batch_columns",
    "dense_parquet_options",
    "dense_row_group_rows",
    "dense_table",
    "grid_arrays",
    "patch_feature_array",
    "write_dense_parquet",
]
ROW_GROUP_BYTES = 32 << 20
"""Target feature bytes per Parquet row group (e.g. 5 images of 1,024 patches x 2 x 768 floats)."""


def patch_feature_array(values: np.ndarray | Sequence[np.ndarray], ok: np.ndarray | None = None) -> pa.ListArray:
    """``List<FixedSizeList<float32>[dim]>`` of per-image ``[patches, dim]`` arrays, without copying a contiguous one.

    ``values``: ``[n, patches, dim]`` float32, or one ``[patches_i, dim]`` array per image.
    ``ok``: optional bool mask over the output rows, ``ok.sum() == n``: rows where it is
    False are null (failed rows of a batch, as ``pipelines.job.actor.feature_array``).
    """
    if isinstance(values, np.ndarray):
        if values.ndim != 3:
            raise ValueError(f"per-patch features must be [images, patches, dim], got shape {values.shape}")
        lengths = np.full(values.shape[0], values.shape[1], dtype=np.int64)
        flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
        dim = values.shape[2]
    else:
        dims = {v.shape[1] for v in values if v.ndim == 2}
        if len(dims) > 1 or any(v.ndim != 2 for v in values):
            raise ValueError("per-patch features must all be [patches, dim] with one dim")
        dim = dims.pop() if dims else 0
        lengths = np.array([v.shape[0] for v in values], dtype=np.int64)
        flat = np.concatenate([np.asarray(v, dtype=np.float32).reshape(-1) for v in values]) if len(values) else np.zeros(0, np.float32)
    rows = len(lengths) if ok is None else len(ok)
    if ok is not None and int(np.sum(ok)) != len(lengths):
        raise ValueError(f"{len(lengths)} feature rows but {int(np.sum(ok))} ok rows")
    full = np.zeros(rows, dtype=np.int64)
    full[np.ones(rows, bool) if ok is None else np.asarray(ok, bool)] = lengths
    offsets = np.zeros(rows + 1, dtype=np.int32)
    np.cumsum(full, out=offsets[1:])
    patches = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float32()), dim)
    mask = None if ok is None else pa.array(~np.asarray(ok, bool))
    return pa.ListArray.from_arrays(pa.array(offsets), patches, mask=mask)


def grid_arrays(grids: np.ndarray, ok: np.ndarray | None = None) -> dict[str, pa.Array]:
    """``grid_rows`` / ``grid_cols`` int32 columns of ``[n, 2]`` grids (null where ``ok`` is False)."""
    grids = np.asarray(grids, dtype=np.int32).reshape(-1, 2)
    rows = len(grids) if ok is None else len(ok)
    full = np.zeros((rows, 2), dtype=np.int32)
    full[np.ones(rows, bool) if ok is None else np.asarray(ok, bool)] = grids
    mask = None if ok is None else ~np.asarray(ok, bool)
    return {name: pa.array(full[:, axis], type=pa.int32(), mask=mask) for axis, name in enumerate(GRID_COLUMNS)}


def dense_batch_columns(batch: "DenseBatch", ok: np.ndarray | None = None) -> dict[str, pa.Array]:
    """Grid and feature columns of a :class:`~fungi_ops.dense.DenseBatch`, for the pipeline's actor.

    ``ok`` (default: the batch's own successful rows) says which output rows have
    features; the others are null, to be dropped to ``_errors/`` by the writer.
    """
    if ok is None:
        ok = np.zeros(len(batch.keys), dtype=bool)
        ok[batch.ok_rows] = True
    n_ok = int(np.sum(ok))
    columns = grid_arrays(np.tile(np.asarray(batch.grid, np.int32), (n_ok, 1)), ok)
    columns.update({name: patch_feature_array(values, ok) for name, values in batch.features.items()})
    return columns


def dense_table(
    ids: Sequence[Any],
    grids: np.ndarray | tuple[int, int],
    features: Mapping[str, np.ndarray | Sequence[np.ndarray]],
    *,
    columns: Mapping[str, Any] | None = None,
    spec: "FeaturizerSpec | None" = None,
) -> pa.Table:
    """A dense table (schema above) of ``n`` images, without a pipeline.

    ``grids``: ``[n, 2]`` or one ``(rows, cols)`` for all; ``features``: name -> ``[n, patches,
    dim]`` or per-image arrays; ``columns``: more per-image columns (arrays or lists), e.g. the
    mask; ``spec``: its JSON and hash go into the schema metadata.
    """
    grid_array = np.asarray(grids, dtype=np.int32)
    if grid_array.ndim == 1:
        grid_array = np.tile(grid_array, (len(ids), 1))
    data: dict[str, Any] = {ID_COLUMN: pa.array([str(i) for i in ids], pa.string())}
    data.update(dict(columns or {}))
    data.update(grid_arrays(grid_array))
    for name, values in features.items():
        array = patch_feature_array(values)
        lengths = pc.list_value_length(array).to_numpy()
        if len(array) != len(ids) or np.any(lengths != grid_array.prod(axis=1)):
            raise ValueError(f"feature {name!r} does not match the ids and grids (patches per image {lengths[:4]}...)")
        data[name] = array
    table = pa.table(data)
    if spec is not None:
        table = table.replace_schema_metadata({SPEC_KEY: spec.to_json().encode(), SPEC_HASH_KEY: spec.hash.encode()})
    return table


def dense_row_group_rows(table: pa.Table) -> int:
    """Rows per Parquet row group so that a group holds about :data:`ROW_GROUP_BYTES` of features."""
    if table.num_rows == 0:
        return 1
    feature_bytes = sum(table.column(name).nbytes for name in table.column_names if name in DENSE_FEATURES)
    return max(1, int(ROW_GROUP_BYTES * table.num_rows // max(1, feature_bytes)))


def dense_parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """Parquet writer options of dense tables: features plain-encoded, nothing compressed.

    Other columns keep Parquet's dictionary encoding; nothing is compressed (the floats do
    not compress, a kept PNG mask already is). For ``pq.write_table`` and ``pq.ParquetWriter``
    alike (the pipeline streams a file through the latter).
    """
    return {"use_dictionary": [name for name in schema.names if name not in DENSE_FEATURES], "compression": "none"}


def write_dense_parquet(table: pa.Table, where: str | os.PathLike[str], filesystem: "pafs.FileSystem | None" = None) -> None:
    """Write a dense table: row groups of :func:`dense_row_group_rows`, :func:`dense_parquet_options`."""
    pq.write_table(
        table, where, filesystem=filesystem, row_group_size=dense_row_group_rows(table), **dense_parquet_options(table.schema)
    )
