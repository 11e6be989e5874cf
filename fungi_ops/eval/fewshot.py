"""Stratified, seeded few-shot sampling of the train split.

Few-shot numbers depend on which examples are drawn, so the paper averages several
draws; each draw takes exactly ``shots`` rows of every train class, chosen by a
``numpy`` generator seeded with the draw's seed, so a (labels, shots, seed) triple
always yields the same rows on any machine.
"""
from __future__ import annotations

import numpy as np

from fungi_ops.eval.errors import EvalInputError, quote

_NAMED_CLASSES = 5  # classes quoted in the error message


def few_shot_indices(labels: np.ndarray, shots: int, seed: int, *, source: str = "the train split") -> np.ndarray:
    """Sorted row indices with exactly ``shots`` rows of every class in ``labels``.

    Raises:
        EvalInputError: ``shots < 1`` or a class has fewer than ``shots`` rows (drawing
            fewer would silently change the protocol); the message names the classes.
    """
    if shots < 1:
        raise EvalInputError(f"shots must be positive, got {shots}")
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    short = np.flatnonzero(counts < shots)
    if short.size:
        named = ", ".join(f"{quote(classes[i])} ({counts[i]})" for i in short[:_NAMED_CLASSES])
        more = f" and {short.size - _NAMED_CLASSES} more" if short.size > _NAMED_CLASSES else ""
        raise EvalInputError(
            f"{shots}-shot evaluation needs {shots} examples of every class in {source}; "
            f"classes with fewer (count): {named}{more}"
        )
    rng = np.random.default_rng(seed)
    permutation = rng.permutation(len(labels))
    # A stable sort by class keeps the random order inside each class: take each group's head.
    grouped = permutation[np.argsort(inverse[permutation], kind="stable")]
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    return np.sort(grouped[(starts[:, None] + np.arange(shots)).ravel()])
