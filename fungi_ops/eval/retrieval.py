"""Retrieval metrics: test rows query the train rows (the gallery), labels define relevance.

A gallery row is relevant to a query when their labels are equal; it is ranked by
decreasing cosine similarity (dot product of unit-norm rows); ties keep gallery order.
For a query with ``R`` relevant gallery rows and ``P(i)`` the precision of the first
``i`` results:

* ``AP = (1/R) * sum over relevant ranks i of P(i)`` (whole ranking) -> mean over queries = **mAP**;
* ``AP@R = (1/R) * sum over relevant ranks i <= R of P(i)`` -> mean = **mAP@R**
  (Musgrave et al., "A Metric Learning Reality Check", 2020).

Queries without any relevant gallery row have no defined AP; they are left out of both
means and counted in :attr:`RetrievalResult.n_skipped`.

Exact mAP needs each query's full ranking, so the cost is ``O(n_query * n_gallery *
log n_gallery)``; queries are processed in chunks so that at most
``max_chunk_elements`` scores are held at once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fungi_ops.eval.device import resolve_device, rows_to_device
from fungi_ops.eval.errors import EvalInputError

DEFAULT_MAX_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class RetrievalResult:
    """Retrieval metrics over the queries that have at least one relevant gallery row.

    Attributes:
        mean_average_precision: mAP, a fraction in ``[0, 1]``.
        map_at_r: mAP@R, a fraction in ``[0, 1]``.
        n_queries: queries averaged over.
        n_skipped: queries without any relevant gallery row.
    """

    mean_average_precision: float
    map_at_r: float
    n_queries: int
    n_skipped: int


def retrieval_metrics(
    queries: np.ndarray,
    query_labels: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    *,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
    device: str | torch.device | None = None,
) -> RetrievalResult:
    """mAP and mAP@R of ``queries`` against ``gallery`` (see the module doc).

    Raises:
        EvalInputError: no query has a relevant gallery row.
    """
    _, codes = np.unique(np.concatenate([gallery_labels, query_labels]), return_inverse=True)
    gallery_codes, query_codes = codes[: len(gallery_labels)], codes[len(gallery_labels) :]
    relevant_counts = np.bincount(gallery_codes, minlength=int(codes.max()) + 1)[query_codes]
    kept = np.flatnonzero(relevant_counts > 0)
    if kept.size == 0:
        raise EvalInputError("no retrieval query has a relevant gallery row (no query label occurs in the gallery)")

    dev = resolve_device(device)
    gallery_t = rows_to_device(gallery, dev)
    gallery_codes_t = torch.from_numpy(gallery_codes).to(dev)
    ranks = torch.arange(1, len(gallery_labels) + 1, device=dev, dtype=torch.float64)
    chunk = max(1, max_chunk_elements // len(gallery_labels))
    ap_sum = ap_at_r_sum = 0.0
    for start in range(0, kept.size, chunk):
        rows = kept[start : start + chunk]
        scores = rows_to_device(queries[rows], dev) @ gallery_t.T
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        relevant = gallery_codes_t[order] == torch.from_numpy(query_codes[rows]).to(dev)[:, None]
        precision = relevant.cumsum(dim=1) / ranks
        r = torch.from_numpy(relevant_counts[rows]).to(dev, torch.float64)
        hits = precision * relevant
        ap_sum += float((hits.sum(dim=1) / r).sum())
        ap_at_r_sum += float(((hits * (ranks[None, :] <= r[:, None])).sum(dim=1) / r).sum())
    return RetrievalResult(
        mean_average_precision=ap_sum / kept.size,
        map_at_r=ap_at_r_sum / kept.size,
        n_queries=int(kept.size),
        n_skipped=int(len(query_labels) - kept.size),
    )
