"""Loading FUNGI feature tables (Parquet written by the featurize pipeline) into numpy.

A feature table is one Parquet file or a directory of them, local or on any filesystem
pyarrow can open from a URI (``s3://...``). Files and directories whose name starts with
``_`` or ``.`` (``_errors/``, ``_fungi_manifest.json``) are bookkeeping of the pipeline
and are skipped. Feature columns are ``FixedSizeList<float32>[dim]`` and are converted
to ``(rows, dim)`` float32 arrays through Arrow buffers, without Python loops, so that
million-row tables load at memory bandwidth.

Every file carries the featurizer spec in its key-value metadata; features produced by
different specs live in different spaces and comparing them would give meaningless
numbers, hence :func:`check_compatible`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from fungi_ops.eval.errors import EvalInputError, quote
from fungi_ops.file_keys import ID_COLUMN, SPEC_HASH_KEY, SPEC_KEY

FEATURE_COLUMNS: tuple[str, ...] = ("embedding", "grad_kl", "grad_dino", "grad_simclr", "grad_dense")
"""Feature columns the pipeline writes, in the paper's incremental-combination order (``grad_dense``:
per-patch tables, see :mod:`fungi_ops.dense_table`)."""


_FINITE_CHECK_ROWS = 65536  # rows per np.isfinite pass, bounds the temporary bool array


@dataclass(frozen=True, eq=False)
class FeatureTable:
    """One split of FUNGI features held in memory.

    Attributes:
        ids: ``(rows,)`` row identifiers, used to name offending rows in errors.
        features: column name (one of :data:`FEATURE_COLUMNS`) -> ``(rows, dim)`` float array.
        labels: ``(rows,)`` class labels, or ``None`` when loaded without a label column.
        spec: the featurizer spec parsed from ``fungi.spec`` metadata, if present.
        spec_hash: the ``fungi.spec_hash`` metadata value, if present.
        source: where the table came from (a path or ``"<memory>"``), quoted in errors.
        label_column: the column the labels were read from, quoted in errors.

    Construction validates shapes and rejects NaN/inf features and missing labels, so
    every later stage can assume clean input.
    """

    ids: np.ndarray
    features: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    spec: dict[str, Any] | None = None
    spec_hash: str | None = None
    source: str = "<memory>"
    label_column: str | None = None

    def __post_init__(self) -> None:
        n = len(self.ids)
        if n == 0:
            raise EvalInputError(f"feature table {self.source} has no rows")
        if not self.features:
            raise EvalInputError(f"feature table {self.source} has no feature columns")
        for name, array in self.features.items():
            if name not in FEATURE_COLUMNS:
                raise EvalInputError(
                    f"unknown feature column {name!r} in {self.source}; expected one of {', '.join(FEATURE_COLUMNS)}"
                )
            if array.ndim != 2 or array.shape[0] != n or not np.issubdtype(array.dtype, np.floating):
                raise EvalInputError(
                    f"feature column {name!r} in {self.source} must be a float array of shape ({n}, dim), "
                    f"got {array.dtype} {array.shape}"
                )
            bad = _first_non_finite_row(array)
            if bad is not None:
                raise EvalInputError(
                    f"feature column {name!r} in {self.source} has NaN or inf values at {self.row_name(bad)}"
                )
        if self.labels is not None:
            if self.labels.shape != (n,):
                raise EvalInputError(
                    f"labels of {self.source} must have shape ({n},), got {self.labels.shape}"
                )
            bad = _first_missing_label(self.labels)
            if bad is not None:
                raise EvalInputError(
                    f"label column {self.label_column or 'labels'!r} in {self.source} is missing a value "
                    f"at {self.row_name(bad)}"
                )

    @property
    def n_rows(self) -> int:
        """Number of rows of the split."""
        return len(self.ids)

    @property
    def dims(self) -> dict[str, int]:
        """Feature column -> dimension."""
        return {name: int(array.shape[1]) for name, array in self.features.items()}

    def row_name(self, index: int) -> str:
        """Human-readable name of a row for error messages: position and id."""
        return _row_name(self.ids, index)


def load_feature_table(
    path: str | os.PathLike[str],
    *,
    label_column: str | None = "label",
    features: Sequence[str] | None = None,
    filesystem: pafs.FileSystem | None = None,
    files: Sequence[str] | None = None,
    where: tuple[str, str] | None = None,
) -> FeatureTable:
    """Read a feature table written by the pipeline.

    Args:
        path: a Parquet file or directory, local or a URI such as ``s3://bucket/prefix``
            (an S3-compatible endpoint goes in the URI:
            ``s3://bucket/prefix?endpoint_override=host:9000&scheme=http``).
        label_column: column holding class labels; ``None`` loads no labels.
        features: feature columns to load; ``None`` loads every column of
            :data:`FEATURE_COLUMNS` present in the table.
        filesystem: explicit pyarrow filesystem (e.g. an ``S3FileSystem`` with custom
            endpoint or credentials); by default it is derived from ``path``.
        files: the table's data files, when a table format says which they are (a fungi
            output's committed files); by default every Parquet file under ``path``.
        where: ``(column, value)``: only the rows whose ``column`` (a kept column such as
            ``split``) equals ``value`` (text, converted to the column's type). The filter is
            pushed down to the Parquet scan (row groups whose statistics exclude the value are
            skipped), so that one output yields its train and test splits.

    Raises:
        EvalInputError: no Parquet files, a missing label or feature column, files of one
            table written by different specs, null/NaN values, or ragged feature lists.
    """
    source = os.fspath(path)
    dataset, spec, spec_hash = open_feature_dataset(source, filesystem, files)
    names = dataset.schema.names
    if label_column is not None and label_column not in names:
        raise EvalInputError(
            f"label column {label_column!r} not found in {source}; columns: {', '.join(names)}"
        )
    columns = _select_feature_columns(names, features, source)

    wanted = [c for c in (ID_COLUMN, label_column) if c is not None and c in names] + columns
    condition = _where_expression(dataset.schema, where, source) if where is not None else None
    try:
        table = dataset.to_table(columns=wanted, filter=condition)
    except (OSError, pa.ArrowException) as exc:
        raise EvalInputError(f"cannot read columns {wanted} from {source}: {exc}") from exc
    if table.num_rows == 0 and where is not None:
        values = pc.unique(dataset.to_table(columns=[where[0]]).column(where[0])).to_pylist()
        shown = ", ".join(repr(v) for v in sorted(values, key=str)[:10]) + (", ..." if len(values) > 10 else "")
        raise EvalInputError(f"no row of {source} has {where[0]}={where[1]}; its values: {shown}")
    if table.num_rows == 0:
        raise EvalInputError(f"feature table {source} has no rows")

    ids = (
        table.column(ID_COLUMN).to_numpy()
        if ID_COLUMN in table.column_names
        else np.arange(table.num_rows)
    )
    labels = (
        _labels_to_numpy(table.column(label_column), label_column, ids, source)
        if label_column is not None
        else None
    )
    arrays = {name: _features_to_numpy(table.column(name), name, ids, source) for name in columns}
    return FeatureTable(
        ids=ids,
        features=arrays,
        labels=labels,
        spec=spec,
        spec_hash=spec_hash,
        source=source,
        label_column=label_column,
    )


def open_feature_dataset(
    source: str, filesystem: pafs.FileSystem | None = None, files: Sequence[str] | None = None
) -> tuple[ds.FileSystemDataset, dict[str, Any] | None, str | None]:
    """``(dataset, spec, spec_hash)`` of a feature table's Parquet files (see :func:`load_feature_table`).

    ``files``: the data files to read (paths on the filesystem of ``source``) instead of
    every Parquet file under ``source``.

    Raises:
        EvalInputError: the path cannot be opened, holds no Parquet file, or its files come
            from different specs.
    """
    fs, root = _resolve_filesystem(source, filesystem)
    try:
        dataset = ds.dataset(list(files) if files is not None else root, format="parquet", filesystem=fs)
    except (OSError, pa.ArrowException) as exc:
        raise EvalInputError(f"cannot open feature table {source}: {exc}") from exc
    if not dataset.files:
        raise EvalInputError(f"no Parquet files found in {source}")
    spec, spec_hash = _read_spec(dataset, source)
    return dataset, spec, spec_hash


def shared_ids(train: FeatureTable, test: FeatureTable) -> int:
    """How many test rows have an id that a train row has too (0 for tables without an ``id`` column).

    A test row found in the train table is its own nearest neighbour: the scores it gets
    measure nothing (one output passed as both splits scores 100 %).
    """
    if train.ids.dtype.kind not in "OUS" or test.ids.dtype.kind not in "OUS":  # positions, not ids
        return 0
    return int(np.isin(test.ids, train.ids).sum())


def check_compatible(train: FeatureTable, test: FeatureTable, columns: Sequence[str]) -> None:
    """Refuse to compare splits whose features live in different spaces.

    Raises:
        EvalInputError: both splits carry a spec hash and they differ, or a feature
            column has different dimensions in the two splits.
    """
    if train.spec_hash is not None and test.spec_hash is not None and train.spec_hash != test.spec_hash:
        raise EvalInputError(
            "train and test features come from different featurizer specs: "
            f"{train.source} has fungi.spec_hash={train.spec_hash}, "
            f"{test.source} has fungi.spec_hash={test.spec_hash}"
        )
    for name in columns:
        train_dim, test_dim = train.dims[name], test.dims[name]
        if train_dim != test_dim:
            raise EvalInputError(
                f"feature column {name!r} has dimension {train_dim} in {train.source} "
                f"but {test_dim} in {test.source}"
            )


def _resolve_filesystem(source: str, filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    """Pick the filesystem: explicit, from a URI, or local (relative paths allowed)."""
    if filesystem is not None:
        return filesystem, source
    if "://" in source:
        try:
            return pafs.FileSystem.from_uri(source)
        except (OSError, pa.ArrowException) as exc:
            raise EvalInputError(f"cannot open feature table {source}: {exc}") from exc
    return pafs.LocalFileSystem(), os.path.abspath(source)


def _select_feature_columns(names: Sequence[str], features: Sequence[str] | None, source: str) -> list[str]:
    if features is None:
        columns = [c for c in FEATURE_COLUMNS if c in names]
        if not columns:
            raise EvalInputError(
                f"no feature columns ({', '.join(FEATURE_COLUMNS)}) found in {source}; columns: {', '.join(names)}"
            )
        return columns
    for name in features:
        if name not in FEATURE_COLUMNS:
            raise EvalInputError(
                f"unknown feature column {name!r}; expected one of {', '.join(FEATURE_COLUMNS)}"
            )
        if name not in names:
            raise EvalInputError(
                f"feature column {name!r} not found in {source}; columns: {', '.join(names)}"
            )
    return list(features)


def _read_spec(dataset: ds.FileSystemDataset, source: str) -> tuple[dict[str, Any] | None, str | None]:
    """Spec and spec hash of a table, checking that all its files agree.

    A directory can accumulate files from several featurize runs; mixing them would
    silently combine incomparable features, so disagreeing hashes are an error.
    """
    spec_bytes: bytes | None = None
    spec_hash: str | None = None
    hash_file: str | None = None
    for fragment in dataset.get_fragments():
        metadata = fragment.physical_schema.metadata or {}
        file_hash = metadata.get(SPEC_HASH_KEY)
        if file_hash is not None:
            decoded = file_hash.decode()
            if spec_hash is None:
                spec_hash, hash_file = decoded, fragment.path
            elif decoded != spec_hash:
                raise EvalInputError(
                    f"files of feature table {source} come from different featurizer specs: "
                    f"{hash_file} has fungi.spec_hash={spec_hash}, {fragment.path} has {decoded}"
                )
        if spec_bytes is None:
            spec_bytes = metadata.get(SPEC_KEY)
    if spec_bytes is None:
        return None, spec_hash
    try:
        return json.loads(spec_bytes), spec_hash
    except json.JSONDecodeError as exc:
        raise EvalInputError(f"fungi.spec metadata of {source} is not valid JSON: {exc}") from exc


def _where_expression(schema: pa.Schema, where: tuple[str, str], source: str) -> ds.Expression:
    """``column == value`` with the text ``value`` converted to the column's type."""
    column, value = where
    if column not in schema.names:
        raise EvalInputError(f"filter {column}={value}: column {column!r} not found in {source}; "
                             f"columns: {', '.join(schema.names)}")
    kind = schema.field(column).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    try:
        scalar = pa.scalar(value).cast(kind)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        raise EvalInputError(f"filter {column}={value}: column {column!r} of {source} is {kind}, "
                             f"which {value!r} is not") from None
    return pc.field(column) == scalar


def _row_name(ids: np.ndarray, index: int) -> str:
    return f"row {index} (id={quote(ids[index])})"


def _labels_to_numpy(column: pa.ChunkedArray, name: str, ids: np.ndarray, source: str) -> np.ndarray:
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if pa.types.is_nested(column.type):
        raise EvalInputError(f"label column {name!r} in {source} must hold scalars, got {column.type}")
    if column.null_count:
        first = int(np.flatnonzero(pc.is_null(column).to_numpy())[0])
        raise EvalInputError(f"label column {name!r} in {source} is null at {_row_name(ids, first)}")
    return column.to_numpy()


def _features_to_numpy(column: pa.ChunkedArray, name: str, ids: np.ndarray, source: str) -> np.ndarray:
    """``FixedSizeList<float>`` (or uniform ``List<float>``) column -> ``(rows, dim)`` float32."""
    kind = column.type
    is_list = pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind)
    if is_list and pa.types.is_fixed_size_list(kind.value_type):
        raise EvalInputError(
            f"feature column {name!r} in {source} holds per-patch features (a dense table): use --task segmentation"
        )
    if not is_list or not pa.types.is_floating(kind.value_type):
        raise EvalInputError(
            f"feature column {name!r} in {source} must be FixedSizeList<float32>, got {kind}"
        )
    if column.null_count:
        first = int(np.flatnonzero(pc.is_null(column).to_numpy())[0])
        raise EvalInputError(f"feature column {name!r} in {source} is null at {_row_name(ids, first)}")
    array = column.combine_chunks()
    if pa.types.is_fixed_size_list(kind):
        dim = kind.list_size
    else:
        lengths = pc.list_value_length(array).to_numpy()
        dim = int(lengths[0])
        ragged = np.flatnonzero(lengths != dim)
        if ragged.size:
            raise EvalInputError(
                f"feature column {name!r} in {source} has {lengths[ragged[0]]} values at "
                f"{_row_name(ids, int(ragged[0]))} but {dim} at row 0"
            )
    flat = array.flatten()
    if flat.null_count:
        first = int(np.flatnonzero(pc.is_null(flat).to_numpy())[0]) // dim
        raise EvalInputError(
            f"feature column {name!r} in {source} has a null value at {_row_name(ids, first)}"
        )
    return np.asarray(flat).astype(np.float32, copy=False).reshape(-1, dim)


def _first_non_finite_row(array: np.ndarray) -> int | None:
    for start in range(0, array.shape[0], _FINITE_CHECK_ROWS):
        finite = np.isfinite(array[start : start + _FINITE_CHECK_ROWS]).all(axis=1)
        if not finite.all():
            return start + int(np.argmin(finite))
    return None


def _first_missing_label(labels: np.ndarray) -> int | None:
    """Missing labels of in-memory tables: ``None`` in object arrays, NaN in float arrays."""
    if labels.dtype == object:
        missing = np.fromiter((value is None for value in labels), dtype=bool, count=len(labels))
    elif np.issubdtype(labels.dtype, np.floating):
        missing = np.isnan(labels)
    else:
        return None
    return int(np.argmax(missing)) if missing.any() else None
