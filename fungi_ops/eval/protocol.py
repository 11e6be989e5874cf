"""The evaluation protocol: every feature combination x every few-shot draw (or k-means seed) x one task.

This is the single entry point behind ``fungi eval`` and notebooks: it checks that the
two splits are comparable, encodes labels, draws the few-shot samples once (the same
rows for every combination, so combinations are compared on identical data), prepares
each combination's matrices (PCA fitted on the whole train split, labels unused), and
runs k-NN, the linear probe, retrieval or clustering on each draw.

Clustering clusters the **test** split, the split every other task scores, so all tasks'
numbers describe the same rows: k-means, with k = the test split's number of classes, is
run on the test rows of each combination once per seed; the train split only fits the PCA
(``pca``) and needs no labels. Test labels only score the partition. Clustering the rows
that are scored is the usual practice for clustering frozen features (no centroid learnt
on other rows stands between the features and the score), and the test split is the
smaller one, which keeps k-means, ``O(rows x k x dim)`` per iteration, affordable.

Test rows whose label never occurs in the train split can never be predicted
correctly: they count as errors for k-NN and the linear probe and are left out of the
retrieval means. Both are announced with an :class:`~fungi_ops.eval.errors.EvalWarning`
and recorded in the report settings.
"""
from __future__ import annotations

import time
import warnings
from typing import Any, Sequence

import numpy as np
import torch

from fungi_ops.eval import clustering
from fungi_ops.eval.combinations import (
    PreparedFeatures,
    combination_name,
    feature_combinations,
    prepare_features,
    resolve_columns,
)
from fungi_ops.eval.device import resolve_device
from fungi_ops.eval.errors import EvalInputError, EvalWarning, quote
from fungi_ops.eval.fewshot import few_shot_indices
from fungi_ops.eval.io import FeatureTable
from fungi_ops.eval.knn import (
    DEFAULT_K,
    DEFAULT_QUERY_CHUNK,
    DEFAULT_TEMPERATURE,
    DEFAULT_TRAIN_CHUNK,
    VOTE_RULES,
    clamp_k,
    knn_classify,
)
from fungi_ops.eval.linear import DEFAULT_C_GRID, DEFAULT_VAL_FRACTION, linear_probe
from fungi_ops.eval.report import CombinationResult, EvalReport, MetricSummary
from fungi_ops.eval.retrieval import retrieval_metrics

TASK_METRICS: dict[str, tuple[str, ...]] = {
    "knn": ("accuracy",),
    "linear": ("accuracy",),
    "retrieval": ("mAP", "mAP@R"),
    "clustering": ("NMI", "ARI", "accuracy"),
    "segmentation": ("mIoU",),
}
TASKS: tuple[str, ...] = tuple(TASK_METRICS)


def evaluate(
    train: FeatureTable,
    test: FeatureTable,
    *,
    task: str = "knn",
    features: Sequence[str] | None = None,
    pca: int | None = None,
    shots: int | None = None,
    seeds: int | None = None,
    k: int = DEFAULT_K,
    vote: str = "weighted",
    temperature: float = DEFAULT_TEMPERATURE,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    device: str | torch.device | None = None,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    train_chunk: int = DEFAULT_TRAIN_CHUNK,
) -> EvalReport:
    """Evaluate every feature combination of ``train``/``test`` on ``task``.

    Args:
        train, test: labelled splits (see :func:`~fungi_ops.eval.io.load_feature_table`).
        task: ``"knn"`` (accuracy), ``"linear"`` (accuracy), ``"retrieval"``
            (mAP and mAP@R, test rows query the train rows) or ``"clustering"`` (NMI, ARI
            and cluster accuracy of k-means on the test rows, see the module doc);
            ``"segmentation"`` is :func:`~fungi_ops.eval.segmentation.evaluate_segmentation`,
            on dense tables.
        features: restrict to these feature columns; ``None`` uses all common ones.
        pca: reduce every combination to this dimension with a PCA fitted on the train
            split (clamped, with a warning, to what the data allows); ``None`` keeps all.
        shots: train examples per class for few-shot evaluation; ``None`` uses all rows
            (clustering takes none).
        seeds: number of few-shot draws, or of k-means runs for clustering (seeds
            ``0 .. seeds-1``); more than one needs ``shots`` except for clustering.
            ``None``: :data:`~fungi_ops.eval.clustering.DEFAULT_SEEDS` for clustering, else 1.
        k, vote, temperature: k-NN settings (see :mod:`fungi_ops.eval.knn`); ``k`` is
            clamped to the train size with a warning.
        c_grid, val_fraction: linear-probe C grid and held-out share of train rows.
        device: torch device for k-NN, PCA and retrieval; ``None`` picks CUDA if available.
        query_chunk, train_chunk: k-NN block sizes (memory vs. speed).

    Raises:
        EvalInputError: unusable input or options; the message says what and where.
    """
    seeds = default_seeds(task) if seeds is None else seeds
    check_options(task=task, pca=pca, shots=shots, seeds=seeds, k=k, vote=vote, temperature=temperature)
    if task == "segmentation":
        raise EvalInputError("segmentation reads dense tables: use fungi_ops.eval.evaluate_segmentation")
    dev = resolve_device(device)
    labelled = (test,) if task == "clustering" else (train, test)  # clustering: test labels only score
    for table in labelled:
        if table.labels is None:
            raise EvalInputError(f"{table.source} has no labels; load it with a label column")
    columns = resolve_columns(train, test, features)
    if task == "clustering":
        classes, test_codes = _cluster_classes(test)
    else:
        classes, train_codes, test_codes = _encode_labels(train, test)

    # Without shots there is one run per seed on all rows: one for k-NN, linear and
    # retrieval (check_options allows no more), one per k-means seed for clustering.
    draws = (
        [None] * seeds
        if shots is None
        else [few_shot_indices(train.labels, shots, seed, source=train.source) for seed in range(seeds)]
    )
    n_fit = train.n_rows if shots is None else shots * len(classes)
    effective_k = clamp_k(k, n_fit) if task == "knn" else k

    def run_task(prepared: PreparedFeatures, draw: np.ndarray | None, seed: int) -> dict[str, Any]:
        if task == "clustering":
            clusters = clustering.kmeans(prepared.test, len(classes), seed=seed)
            scores = clustering.clustering_scores(test_codes, clusters)
            return {"NMI": scores.nmi, "ARI": scores.ari, "accuracy": scores.accuracy}
        fit_x = prepared.train if draw is None else prepared.train[draw]
        fit_y = train_codes if draw is None else train_codes[draw]
        if task == "knn":
            predictions = knn_classify(
                fit_x, fit_y, prepared.test, len(classes), k=effective_k, vote=vote,
                temperature=temperature, query_chunk=query_chunk, train_chunk=train_chunk, device=dev,
            )
            return {"accuracy": float(np.mean(predictions == test_codes))}
        if task == "linear":
            probe = linear_probe(fit_x, fit_y, prepared.test, c_grid=c_grid, val_fraction=val_fraction, seed=seed)
            return {
                "accuracy": float(np.mean(probe.predictions == test_codes)),
                "c": probe.c,
                "validation_accuracy": probe.validation_accuracy,
            }
        found = retrieval_metrics(prepared.test, test_codes, fit_x, fit_y, device=dev)
        return {"mAP": found.mean_average_precision, "mAP@R": found.map_at_r}

    metric_names = TASK_METRICS[task]
    results = []
    for combo in feature_combinations(columns):
        started = time.perf_counter()
        prepared = prepare_features(train, test, combo, pca_dim=pca, device=dev)
        runs = [run_task(prepared, draw, seed) for seed, draw in enumerate(draws)]
        results.append(
            CombinationResult(
                name=combination_name(combo),
                columns=combo,
                input_dim=prepared.input_dim,
                dim=prepared.dim,
                metrics={m: MetricSummary.from_values([run[m] for run in runs]) for m in metric_names},
                details={key: [run[key] for run in runs] for key in runs[0] if key not in metric_names},
                seconds=time.perf_counter() - started,
            )
        )

    settings: dict[str, Any] = {
        "train": _split_settings(train),
        "test": _split_settings(test),
        "label_column": test.label_column,
        "n_classes": int(len(classes)),
        "features": columns,
        "pca": pca,
        "pca_fit_rows": train.n_rows if pca is not None else None,
        "shots": shots,
        "seeds": list(range(seeds)) if shots is not None or task == "clustering" else [],
        "device": str(dev),
    }
    if task == "clustering":
        settings.update(clustered_split="test", n_clusters=int(len(classes)))
    else:
        settings["test_rows_unseen_label"] = int(np.sum(test_codes < 0))
    if task == "knn":
        settings.update(k=effective_k, k_requested=k, vote=vote, temperature=temperature)
    elif task == "linear":
        settings.update(c_grid=[float(c) for c in c_grid], val_fraction=val_fraction)
    return EvalReport(task=task, metric_names=metric_names, settings=settings, results=tuple(results))


def check_options(
    *, task: str, pca: int | None, shots: int | None, seeds: int, k: int, vote: str, temperature: float
) -> None:
    """Reject bad :func:`evaluate` options before any expensive work (also used by the CLI before loading)."""
    if task not in TASKS:
        raise EvalInputError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if task == "segmentation" and (pca is not None or shots is not None):
        raise EvalInputError("segmentation takes no --pca or --shots (the HummingBird protocol uses every train image)")
    if task == "clustering" and shots is not None:
        raise EvalInputError("clustering takes no --shots (k-means clusters every test row; --seeds sets the k-means runs)")
    if pca is not None and pca < 1:
        raise EvalInputError(f"PCA dimension must be positive, got {pca}")
    if shots is not None and shots < 1:
        raise EvalInputError(f"shots must be positive, got {shots}")
    if seeds < 1:
        raise EvalInputError(f"seeds must be positive, got {seeds}")
    if seeds > 1 and shots is None and task != "clustering":
        raise EvalInputError("several seeds only make sense for few-shot evaluation or clustering; set shots")
    if k < 1:
        raise EvalInputError(f"k must be positive, got {k}")
    if vote not in VOTE_RULES:
        raise EvalInputError(f"vote must be one of {', '.join(VOTE_RULES)}, got {vote!r}")
    if temperature <= 0:
        raise EvalInputError(f"temperature must be positive, got {temperature}")


def default_seeds(task: str) -> int:
    """Runs averaged when no seed count is given: several k-means seeds for clustering, else one."""
    return clustering.DEFAULT_SEEDS if task == "clustering" else 1


def _cluster_classes(test: FeatureTable) -> tuple[np.ndarray, np.ndarray]:
    """The test split's classes and each row's class index; rejects a split k-means cannot score."""
    try:
        classes, codes = np.unique(test.labels, return_inverse=True)
    except TypeError as exc:
        raise EvalInputError(f"labels of {test.source} ({test.labels.dtype}) cannot be compared: {exc}") from exc
    column = repr(test.label_column or "labels")
    # One cluster, or one row per cluster, scores the same whatever the features (see clustering.kmeans).
    if len(classes) < 2:
        raise EvalInputError(
            f"clustering needs at least 2 classes (k = the number of classes): {test.source} has only "
            f"class {quote(classes[0])} in column {column}"
        )
    if test.n_rows <= len(classes):
        raise EvalInputError(
            f"clustering needs more rows than classes (k = the number of classes): {test.source} has "
            f"{test.n_rows} rows for {len(classes)} classes in column {column}"
        )
    return classes, codes.astype(np.int64)


def _encode_labels(train: FeatureTable, test: FeatureTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train classes and class indices of both splits; unseen test labels get index -1."""
    try:
        classes, train_codes = np.unique(train.labels, return_inverse=True)
        positions = np.searchsorted(classes, test.labels).clip(max=len(classes) - 1)
        seen = classes[positions] == test.labels
    except TypeError as exc:
        raise EvalInputError(
            f"labels of {train.source} ({train.labels.dtype}) and {test.source} ({test.labels.dtype}) "
            f"cannot be compared: {exc}"
        ) from exc
    test_codes = np.where(seen, positions, -1)
    if not seen.any():
        raise EvalInputError(
            f"no label of {test.source} ({test.labels.dtype}, e.g. {quote(test.labels[0])}) occurs in "
            f"{train.source} ({train.labels.dtype}, e.g. {quote(train.labels[0])}); check the label column"
        )
    if not seen.all():
        unseen = test.labels[~seen]
        warnings.warn(
            f"{unseen.size} test rows of {test.source} have labels absent from {train.source} "
            f"(e.g. {quote(unseen[0])}); they count as errors for k-NN/linear and are skipped as retrieval queries",
            EvalWarning,
            stacklevel=3,
        )
    return classes, train_codes.astype(np.int64), test_codes.astype(np.int64)


def _split_settings(table: FeatureTable) -> dict[str, Any]:
    return {"source": table.source, "rows": table.n_rows, "spec_hash": table.spec_hash, "spec": table.spec}
