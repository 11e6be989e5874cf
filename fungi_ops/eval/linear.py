"""Linear probe: logistic regression on standardised features, C chosen on held-out train rows.

Choosing the regularisation strength on the test split would leak test labels into the
number we report, so a stratified part of the train split is held out, every C of the
grid is scored on it, and the best C (the smallest one on ties, i.e. the strongest
regularisation) is refitted on the whole train split. The scaler is part of the fitted
pipeline, so its statistics also come from train rows only.

When the held-out split is impossible (a class with a single train example, as in
1-shot evaluation), :data:`FALLBACK_C` is used with an
:class:`~fungi_ops.eval.errors.EvalWarning`; the result says no validation happened.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from fungi_ops.eval.errors import EvalInputError, EvalWarning

DEFAULT_C_GRID: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
DEFAULT_VAL_FRACTION = 0.2
FALLBACK_C = 1.0
DEFAULT_MAX_ITER = 1000


@dataclass(frozen=True)
class LinearProbeResult:
    """Outcome of :func:`linear_probe`.

    Attributes:
        predictions: ``(n_test,)`` predicted class indices.
        c: the inverse regularisation strength used for the final fit.
        validation_accuracy: held-out accuracy of ``c``; ``None`` when it was not
            selected on a held-out split (single-value grid or too few examples).
    """

    predictions: np.ndarray
    c: float
    validation_accuracy: float | None


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    *,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    max_iter: int = DEFAULT_MAX_ITER,
) -> LinearProbeResult:
    """Fit the probe on ``(train_x, train_y)`` and predict ``test_x``.

    Args:
        train_x, test_x: ``(n, d)`` features.
        train_y: ``(n_train,)`` class indices.
        c_grid: candidate inverse regularisation strengths.
        val_fraction: share of train rows held out to choose C (at least one per class).
        seed: seed of the held-out split.
        max_iter: L-BFGS iterations.
    """
    grid = sorted(float(c) for c in c_grid)
    if not grid or grid[0] <= 0:
        raise EvalInputError(f"the C grid must hold positive values, got {list(c_grid)}")
    if not 0 < val_fraction < 1:
        raise EvalInputError(f"val_fraction must be in (0, 1), got {val_fraction}")
    classes, counts = np.unique(train_y, return_counts=True)
    if classes.size < 2:
        raise EvalInputError("the linear probe needs at least two classes in the train split")

    best_c, best_accuracy = _select_c(train_x, train_y, grid, counts, val_fraction, seed, max_iter)
    model = _probe(best_c, max_iter).fit(train_x, train_y)
    return LinearProbeResult(model.predict(test_x), best_c, best_accuracy)


def _probe(c: float, max_iter: int) -> Pipeline:
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))


def _select_c(
    x: np.ndarray,
    y: np.ndarray,
    grid: list[float],
    counts: np.ndarray,
    val_fraction: float,
    seed: int,
    max_iter: int,
) -> tuple[float, float | None]:
    if len(grid) == 1:
        return grid[0], None
    n, n_classes = len(y), counts.size
    n_val = max(math.ceil(val_fraction * n), n_classes)
    if counts.min() < 2 or n - n_val < n_classes:
        warnings.warn(
            f"cannot hold out a validation split with one example per class from {n} train rows "
            f"(smallest class has {counts.min()}); using C={FALLBACK_C}",
            EvalWarning,
            stacklevel=3,
        )
        return FALLBACK_C, None
    fit_x, val_x, fit_y, val_y = train_test_split(x, y, test_size=n_val, stratify=y, random_state=seed)
    accuracies = [float(np.mean(_probe(c, max_iter).fit(fit_x, fit_y).predict(val_x) == val_y)) for c in grid]
    best = int(np.argmax(accuracies))  # first maximum = smallest C
    return grid[best], accuracies[best]
