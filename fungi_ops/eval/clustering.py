"""k-means clustering of feature rows, scored against the labels: NMI, ARI and cluster accuracy.

The paper's clustering evaluation: k-means with ``k`` = the number of classes on the
prepared rows of a combination (blocks L2-normalised, optional PCA, L2-normalised again,
see :mod:`fungi_ops.eval.combinations`), one run per seed, mean and spread over seeds.
Labels never reach the clustering; they only score the partition it returns.

k-means is scikit-learn's (Lloyd, k-means++ initialisation, one initialisation per seed,
``random_state`` = the seed), so a seed gives the same partition on every run and the
spread over seeds measures k-means' sensitivity to its initialisation. It runs on the CPU
(all cores, OpenMP); on unit-norm rows the Euclidean objective orders points like cosine
similarity, the geometry every other task uses.

Scores, each 1 for a partition equal to the classes up to renaming the clusters:

* **NMI**: mutual information of classes and clusters over the arithmetic mean of their
  entropies (``sklearn.metrics.normalized_mutual_info_score``); ~0 for independent ones;
* **ARI**: Rand index adjusted for chance (``sklearn.metrics.adjusted_rand_score``), 0 in
  expectation for a random partition, negative when worse than chance;
* **accuracy**: the share of rows whose cluster is mapped to their class by the best
  one-to-one mapping of clusters to classes (Hungarian matching on the contingency table,
  ``scipy.optimize.linear_sum_assignment``); unlike purity, two clusters cannot both be
  credited with the same class.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix

from fungi_ops.eval.errors import EvalInputError

DEFAULT_SEEDS = 5
"""k-means runs (seeds ``0 .. DEFAULT_SEEDS - 1``) averaged when the caller names no count."""


@dataclass(frozen=True)
class ClusteringScores:
    """Agreement of one partition with the classes, each a fraction (ARI may be negative).

    Attributes:
        nmi: normalised mutual information, in ``[0, 1]``.
        ari: adjusted Rand index, in ``[-0.5, 1]``.
        accuracy: cluster accuracy under the best one-to-one cluster -> class mapping, in ``[0, 1]``.
    """

    nmi: float
    ari: float
    accuracy: float


def kmeans(x: np.ndarray, n_clusters: int, *, seed: int) -> np.ndarray:
    """Cluster index in ``[0, n_clusters)`` of every row of ``x`` (one seeded k-means++ run).

    Raises:
        EvalInputError: fewer than 2 clusters, or not more rows than clusters. One cluster
            scores NMI 0 and accuracy 1 whatever the features; as many clusters as rows
            puts every row alone and scores 1 on every metric: neither measures anything.
    """
    if n_clusters < 2:
        raise EvalInputError(f"k-means needs at least 2 clusters, got {n_clusters}")
    if x.shape[0] <= n_clusters:
        raise EvalInputError(f"k-means needs more rows than clusters: {x.shape[0]} rows for {n_clusters} clusters")
    model = KMeans(n_clusters=n_clusters, init="k-means++", n_init=1, random_state=seed)
    return model.fit_predict(x).astype(np.int64)


def cluster_accuracy(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Share of rows correct under the best one-to-one mapping of clusters to classes (Hungarian)."""
    counts = contingency_matrix(labels, clusters)  # classes x clusters
    rows, columns = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, columns].sum() / len(labels))


def clustering_scores(labels: np.ndarray, clusters: np.ndarray) -> ClusteringScores:
    """NMI, ARI and cluster accuracy of the partition ``clusters`` against ``labels`` (any comparable ids)."""
    if labels.shape != clusters.shape:
        raise EvalInputError(f"{labels.shape[0]} labels for {clusters.shape[0]} cluster assignments")
    return ClusteringScores(
        nmi=float(normalized_mutual_info_score(labels, clusters)),
        ari=float(adjusted_rand_score(labels, clusters)),
        accuracy=cluster_accuracy(labels, clusters),
    )
