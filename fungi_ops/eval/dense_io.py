"""Reading dense feature tables (schema in :mod:`fungi_ops.dense_table`) in batches of images.

Kept in the eval package (``fungi_ops.dense_table`` re-exports it) so that it shares the
table opening, spec checks and errors of :mod:`fungi_ops.eval.io`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fungi_ops.eval.errors import EvalInputError
from fungi_ops.eval.io import open_feature_dataset
from fungi_ops.file_keys import ID_COLUMN

if TYPE_CHECKING:
    import pyarrow.fs as pafs

GRID_COLUMNS: tuple[str, str] = ("grid_rows", "grid_cols")
DENSE_FEATURES: tuple[str, ...] = ("embedding", "grad_dense")


@dataclass
class DenseRows:
    """One batch of images read from a dense table.

    Attributes:
        ids: ``(n,)`` string ids.
        grids: ``(n, 2)`` int patch grids (rows, cols).
        offsets: ``(n + 1,)`` start of each image's patches in the feature matrices.
        features: name -> ``(total patches, dim)`` float32, every image's patches stacked
            (a read-only view of the Arrow buffer).
        columns: other requested columns, as Python lists.
    """

    ids: np.ndarray
    grids: np.ndarray
    offsets: np.ndarray
    features: dict[str, np.ndarray]
    columns: dict[str, list[Any]]

    def patches(self, name: str, row: int) -> np.ndarray:
        """``[patches, dim]`` features ``name`` of image ``row`` of the batch."""
        return self.features[name][self.offsets[row] : self.offsets[row + 1]]


class DenseReader:
    """Read a dense table (a Parquet file or directory, local or a URI such as ``s3://``) in batches.

    ``files``: the data files to read instead of every Parquet file under ``path`` (see
    :func:`~fungi_ops.eval.io.open_feature_dataset`).
    ``spec`` / ``spec_hash`` come from the files' metadata (all files must agree);
    ``features`` lists the dense feature columns present. Raises EvalInputError for a
    missing path, files of different specs, or a table that is not dense.
    """

    def __init__(self, path: str | os.PathLike[str], *, filesystem: "pafs.FileSystem | None" = None,
                 files: Sequence[str] | None = None) -> None:
        self.source = os.fspath(path)
        self.dataset, self.spec, self.spec_hash = open_feature_dataset(self.source, filesystem, files)
        schema = self.dataset.schema
        missing = [name for name in (ID_COLUMN, *GRID_COLUMNS) if name not in schema.names]
        self.features = [name for name in DENSE_FEATURES if name in schema.names]
        if missing or not self.features:
            raise EvalInputError(
                f"{self.source} is not a dense feature table (needs {ID_COLUMN}, {', '.join(GRID_COLUMNS)} and "
                f"{' or '.join(DENSE_FEATURES)}); columns: {', '.join(schema.names)}"
            )
        for name in self.features:
            kind = schema.field(name).type
            if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not pa.types.is_fixed_size_list(kind.value_type):
                raise EvalInputError(f"column {name!r} of {self.source} is {kind}, not List<FixedSizeList<float32>>")

    @property
    def n_rows(self) -> int:
        """Images in the table (from the Parquet footers; no data is read)."""
        return int(self.dataset.count_rows())

    @property
    def dims(self) -> dict[str, int]:
        """Dense feature column -> vector size."""
        return {name: int(self.dataset.schema.field(name).type.value_type.list_size) for name in self.features}

    def has_column(self, name: str) -> bool:
        """Whether the table has a column ``name`` (e.g. a kept mask or image column)."""
        return name in self.dataset.schema.names

    def batches(
        self, features: Sequence[str] | None = None, columns: Sequence[str] = (), batch_rows: int = 16
    ) -> Iterator[DenseRows]:
        """Yield :class:`DenseRows` of up to ``batch_rows`` images (a batch never spans two row groups).

        Files in the dataset's order, rows in file order. Memory: one batch's columns at a time.
        """
        features = list(self.features if features is None else features)
        for name in [*features, *columns]:
            if not self.has_column(name):
                raise EvalInputError(f"column {name!r} not found in {self.source}; columns: {', '.join(self.dataset.schema.names)}")
        wanted = list(dict.fromkeys([ID_COLUMN, *GRID_COLUMNS, *features, *columns]))
        for record in self.dataset.to_batches(columns=wanted, batch_size=batch_rows):
            if record.num_rows == 0:
                continue
            ids = np.asarray(record.column(ID_COLUMN).to_pylist(), dtype=object)
            grids = np.stack([record.column(name).to_numpy(zero_copy_only=False) for name in GRID_COLUMNS], axis=1)
            arrays, offsets = {}, None
            for name in features:
                column = record.column(name)
                if column.null_count:
                    raise EvalInputError(f"column {name!r} of {self.source} has null rows")
                lengths = pc.list_value_length(column).to_numpy()
                if np.any(lengths != grids.prod(axis=1)):
                    raise EvalInputError(f"column {name!r} of {self.source}: patch counts do not match the grids")
                dim = column.type.value_type.list_size
                arrays[name] = column.flatten().flatten().to_numpy().reshape(-1, dim)
                offsets = np.concatenate([[0], np.cumsum(lengths)])
            if offsets is None:
                offsets = np.concatenate([[0], np.cumsum(grids.prod(axis=1))])
            yield DenseRows(
                ids=ids,
                grids=grids.astype(np.int64),
                offsets=offsets.astype(np.int64),
                features=arrays,
                columns={name: record.column(name).to_pylist() for name in columns},
            )
