"""Weighted k-NN classification, the paper's main protocol, at data-lake scale.

Similarity: the dot product of unit-norm rows, i.e. cosine similarity of the
concatenated, block-normalised features (see :mod:`fungi_ops.eval.combinations`).

Neighbour search never materialises an ``n_test x n_train`` matrix: train rows are
streamed in chunks (each moved to the device once), every query chunk is multiplied
against the train chunk, and a running top-k per query is merged with the chunk's
top-k. Memory is ``query_chunk x train_chunk`` scores plus ``n_test x k`` results, so
millions of train rows fit on one machine, on CPU or GPU.

Vote rules:

* ``"weighted"`` (default, as DINO's k-NN evaluation used by the paper): each of the
  ``k`` neighbours votes for its class with weight ``exp(similarity / temperature)``,
  temperature 0.07; the class with the largest summed weight wins.
* ``"majority"``: one vote per neighbour; ties are broken by the larger summed
  similarity, then by the smaller class index.

A class with fewer than ``k`` train examples is allowed: its neighbours simply share
the ``k`` slots with other classes. ``k`` larger than the train set is clamped to the
train size with an :class:`~fungi_ops.eval.errors.EvalWarning` (see :func:`clamp_k`).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from fungi_ops.eval.device import resolve_device, rows_to_device
from fungi_ops.eval.errors import EvalInputError, EvalWarning

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07
VOTE_RULES: tuple[str, ...] = ("weighted", "majority")
DEFAULT_QUERY_CHUNK = 4096
DEFAULT_TRAIN_CHUNK = 65536
_VOTE_CHUNK = 8192  # query rows per vote step, bounds the (rows, classes) score matrix


def clamp_k(k: int, n_train: int) -> int:
    """``k`` limited to the train size, with an :class:`EvalWarning` when it had to shrink."""
    if k < 1:
        raise EvalInputError(f"k must be positive, got {k}")
    if k > n_train:
        warnings.warn(
            f"k={k} exceeds the {n_train} train rows; using k={n_train}", EvalWarning, stacklevel=2
        )
        return n_train
    return k


def knn_search(
    queries: np.ndarray,
    train: np.ndarray,
    k: int,
    *,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    train_chunk: int = DEFAULT_TRAIN_CHUNK,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` train rows with the largest dot product for every query row.

    Args:
        queries: ``(n_query, d)`` rows.
        train: ``(n_train, d)`` rows; ``k <= n_train`` is required.
        k: neighbours per query.
        query_chunk, train_chunk: rows per block of the chunked score matrix.
        device: torch device; ``None`` picks CUDA when available.

    Returns:
        ``(similarities, indices)``, both ``(n_query, k)``, sorted by decreasing
        similarity; indices point into ``train``.
    """
    n_train = train.shape[0]
    if not 1 <= k <= n_train:
        raise EvalInputError(f"k must be between 1 and the {n_train} train rows, got {k}")
    if queries.shape[1] != train.shape[1]:
        raise EvalInputError(
            f"query dimension {queries.shape[1]} differs from train dimension {train.shape[1]}"
        )
    dev = resolve_device(device)
    n_query = queries.shape[0]
    best_sims = torch.full((n_query, k), -torch.inf, device=dev)
    best_idx = torch.full((n_query, k), -1, dtype=torch.int64, device=dev)
    for t_start in range(0, n_train, train_chunk):
        block = rows_to_device(train[t_start : t_start + train_chunk], dev)
        block_k = min(k, block.shape[0])
        for q_start in range(0, n_query, query_chunk):
            q_stop = q_start + query_chunk
            scores = rows_to_device(queries[q_start:q_stop], dev) @ block.T
            sims, idx = scores.topk(block_k, dim=1)
            merged_sims = torch.cat([best_sims[q_start:q_stop], sims], dim=1)
            merged_idx = torch.cat([best_idx[q_start:q_stop], idx + t_start], dim=1)
            top_sims, positions = merged_sims.topk(k, dim=1)
            best_sims[q_start:q_stop] = top_sims
            best_idx[q_start:q_stop] = merged_idx.gather(1, positions)
    return best_sims.cpu().numpy(), best_idx.cpu().numpy()


def knn_vote(
    similarities: np.ndarray,
    neighbour_labels: np.ndarray,
    n_classes: int,
    *,
    vote: str = "weighted",
    temperature: float = DEFAULT_TEMPERATURE,
) -> np.ndarray:
    """Predicted class index per query from its neighbours (see the module doc for the rules).

    Args:
        similarities: ``(n_query, k)`` neighbour similarities.
        neighbour_labels: ``(n_query, k)`` class indices in ``[0, n_classes)``.
        n_classes: number of classes.
        vote: ``"weighted"`` or ``"majority"``.
        temperature: softness of the weighted vote.
    """
    predictions = np.empty(similarities.shape[0], dtype=np.int64)
    for start in range(0, similarities.shape[0], _VOTE_CHUNK):
        scores = vote_scores(
            similarities[start : start + _VOTE_CHUNK], neighbour_labels[start : start + _VOTE_CHUNK], n_classes,
            vote=vote, temperature=temperature,
        )
        predictions[start : start + scores.shape[0]] = scores.argmax(axis=1)
    return predictions


def vote_scores(
    similarities: np.ndarray,
    neighbour_labels: np.ndarray,
    n_classes: int,
    *,
    vote: str = "weighted",
    temperature: float = DEFAULT_TEMPERATURE,
) -> np.ndarray:
    """``(n_query, n_classes)`` float64 votes of the neighbours, whose argmax is :func:`knn_vote`'s class.

    Weighted: the summed ``exp((similarity - the row's best) / temperature)`` per class;
    majority: the count per class plus a tie-breaking term in ``[0, 1)``. ``fungi serve``
    reports them per label, so one function computes both the vote and what it shows.
    """
    if vote not in VOTE_RULES:
        raise EvalInputError(f"vote must be one of {', '.join(VOTE_RULES)}, got {vote!r}")
    if temperature <= 0:
        raise EvalInputError(f"temperature must be positive, got {temperature}")
    k = similarities.shape[1]
    sims = torch.from_numpy(np.ascontiguousarray(similarities, dtype=np.float32))
    labels = torch.from_numpy(np.ascontiguousarray(neighbour_labels, dtype=np.int64))
    scores = torch.zeros((sims.shape[0], n_classes), dtype=torch.float64)
    if vote == "weighted":
        # Shifting by the row maximum leaves the argmax unchanged and avoids overflow.
        weights = torch.exp((sims - sims.max(dim=1, keepdim=True).values).double() / temperature)
        scores.scatter_add_(1, labels, weights)
    else:
        scores.scatter_add_(1, labels, torch.ones_like(sims, dtype=torch.float64))
        summed = torch.zeros_like(scores).scatter_add_(1, labels, sims.double())
        # Summed similarity lies in [-k, k], so this term is in [0, 1): it only breaks ties.
        scores += (summed + k) / (2 * k + 1)
    return scores.numpy()


def knn_classify(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    n_classes: int,
    *,
    k: int = DEFAULT_K,
    vote: str = "weighted",
    temperature: float = DEFAULT_TEMPERATURE,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    train_chunk: int = DEFAULT_TRAIN_CHUNK,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Predict class indices of ``test_x`` by k-NN over ``(train_x, train_y)``.

    Rows are expected to be unit-norm (cosine similarity); ``train_y`` holds class
    indices in ``[0, n_classes)``. ``k`` is clamped to the train size (see :func:`clamp_k`).
    """
    k = clamp_k(k, train_x.shape[0])
    sims, idx = knn_search(
        test_x, train_x, k, query_chunk=query_chunk, train_chunk=train_chunk, device=device
    )
    return knn_vote(sims, train_y[idx], n_classes, vote=vote, temperature=temperature)
