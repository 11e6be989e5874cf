"""Feature combinations of the paper's tables and the matrix each one is evaluated on.

The paper reports the embedding alone, each gradient alone, and the embedding with the
gradients added one at a time (KL, then DINO, then SimCLR). Every block is
L2-normalised before concatenation so that no block dominates the cosine similarity
because of its scale; the concatenation is optionally reduced by a PCA fitted on the
train split, and finally L2-normalised so that a dot product is a cosine similarity.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from fungi_ops.eval.errors import EvalInputError, EvalWarning
from fungi_ops.eval.io import FEATURE_COLUMNS, FeatureTable, check_compatible
from fungi_ops.eval.pca import PCAProjection, fit_pca

_NORM_EPS = 1e-12  # a zero row stays zero (cosine similarity 0 to everything) instead of NaN


@dataclass(frozen=True)
class PreparedFeatures:
    """Train and test matrices of one combination, ready for k-NN, probing or retrieval.

    Attributes:
        columns: the feature columns combined, in concatenation order.
        train: ``(n_train, dim)`` float32 rows, unit L2 norm.
        test: ``(n_test, dim)`` float32 rows, unit L2 norm.
        input_dim: dimension of the concatenation before PCA.
        pca: the projection fitted on train rows, or ``None`` without PCA.
    """

    columns: tuple[str, ...]
    train: np.ndarray
    test: np.ndarray
    input_dim: int
    pca: PCAProjection | None

    @property
    def dim(self) -> int:
        """Dimension the classifier sees (after PCA)."""
        return int(self.train.shape[1])


def combination_name(columns: Sequence[str]) -> str:
    """Display name of a combination, e.g. ``embedding+grad_kl``."""
    return "+".join(columns)


def feature_combinations(columns: Sequence[str]) -> list[tuple[str, ...]]:
    """Combinations to evaluate for the available ``columns``, in the paper's order.

    Each column alone, then the incremental concatenations of the present columns in
    :data:`FEATURE_COLUMNS` order (``embedding+grad_kl``, ``embedding+grad_kl+grad_dino``,
    ...). With all four columns this yields seven combinations.
    """
    present = [name for name in FEATURE_COLUMNS if name in columns]
    singles = [(name,) for name in present]
    incremental = [tuple(present[:size]) for size in range(2, len(present) + 1)]
    return singles + incremental


def resolve_columns(train: FeatureTable, test: FeatureTable, features: Sequence[str] | None) -> list[str]:
    """Feature columns to evaluate, in :data:`FEATURE_COLUMNS` order, checked for compatibility.

    With ``features=None`` the columns present in both splits are used and a column
    present in only one split is skipped with an :class:`EvalWarning`. Requested columns
    must exist in both splits.

    Raises:
        EvalInputError: unknown or missing requested column, no common column, or
            incompatible splits (see :func:`~fungi_ops.eval.io.check_compatible`).
    """
    if features is None:
        columns = [c for c in FEATURE_COLUMNS if c in train.features and c in test.features]
        skipped = [c for c in FEATURE_COLUMNS if (c in train.features) != (c in test.features)]
        if skipped:
            warnings.warn(
                f"feature columns {', '.join(skipped)} are present in only one of {train.source} "
                f"and {test.source}; they are not evaluated",
                EvalWarning,
                stacklevel=2,
            )
        if not columns:
            raise EvalInputError(f"{train.source} and {test.source} have no feature column in common")
    else:
        for name in features:
            if name not in FEATURE_COLUMNS:
                raise EvalInputError(
                    f"unknown feature column {name!r}; expected one of {', '.join(FEATURE_COLUMNS)}"
                )
            for table in (train, test):
                if name not in table.features:
                    raise EvalInputError(
                        f"feature column {name!r} not found in {table.source}; "
                        f"it has {', '.join(table.features)}"
                    )
        columns = [c for c in FEATURE_COLUMNS if c in features]
        if not columns:
            raise EvalInputError("no feature column requested")
    check_compatible(train, test, columns)
    return columns


def combine_blocks(table: FeatureTable, columns: Sequence[str]) -> np.ndarray:
    """Concatenate the L2-normalised blocks ``columns`` of ``table`` into ``(rows, sum dims)`` float32."""
    dims = [table.dims[name] for name in columns]
    out = np.empty((table.n_rows, sum(dims)), dtype=np.float32)
    start = 0
    for name, dim in zip(columns, dims):
        block = table.features[name]
        np.divide(block, _row_norms(block)[:, None], out=out[:, start : start + dim])
        start += dim
    return out


def unit_concatenation(table: FeatureTable, columns: Sequence[str]) -> np.ndarray:
    """The combination ``columns`` of ``table`` without PCA: :func:`combine_blocks`, then unit rows.

    What :func:`prepare_features` gives without ``pca_dim``, for one table: ``fungi serve``
    builds its index and its queries' vectors with it, so that they are those ``fungi eval`` compares.
    """
    rows = combine_blocks(table, columns)
    _normalise_rows_inplace(rows)
    return rows


def prepare_features(
    train: FeatureTable,
    test: FeatureTable,
    columns: Sequence[str],
    *,
    pca_dim: int | None = None,
    device: str | torch.device | None = None,
) -> PreparedFeatures:
    """Build the train and test matrices of one combination.

    The PCA (when ``pca_dim`` is given) is fitted on the train rows only; test rows are
    only projected. Both outputs are L2-normalised last, so dot products are cosine
    similarities in the (possibly reduced) space.
    """
    train_x = combine_blocks(train, columns)
    test_x = combine_blocks(test, columns)
    input_dim = train_x.shape[1]
    projection = None
    if pca_dim is not None:
        projection = fit_pca(train_x, pca_dim, device=device)
        train_x = projection.transform(train_x, device=device)
        test_x = projection.transform(test_x, device=device)
    _normalise_rows_inplace(train_x)
    _normalise_rows_inplace(test_x)
    return PreparedFeatures(tuple(columns), train_x, test_x, input_dim, projection)


def _row_norms(x: np.ndarray) -> np.ndarray:
    """Row L2 norms clamped away from zero, without an ``(n, d)`` temporary."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    return np.maximum(norms, _NORM_EPS).astype(x.dtype)


def _normalise_rows_inplace(x: np.ndarray) -> None:
    x /= _row_norms(x)[:, None]
