"""Evaluation of FUNGI features: k-NN, linear probe, few-shot, retrieval and clustering, as in the paper.

Pure numpy / torch / scikit-learn / matplotlib (no Ray), usable from notebooks::

    from fungi_ops.eval import load_feature_table, evaluate, write_report

    train = load_feature_table("s3://bucket/features/train", label_column="label")
    test = load_feature_table("s3://bucket/features/test", label_column="label")
    report = evaluate(train, test, task="knn", pca=768, shots=5, seeds=3)
    print(report.to_markdown())
    write_report(report, "eval_out")

Protocol summary (details in each module):

* every feature block is L2-normalised, blocks are concatenated in the order
  embedding, grad_kl, grad_dino, grad_simclr, optionally reduced by a PCA fitted on the
  train split only (all its rows, also for few-shot; labels unused), and L2-normalised
  again; similarity is cosine;
* k-NN: k=20, DINO-style similarity-weighted vote with temperature 0.07 (or majority);
  k above the train size is clamped with an :class:`EvalWarning`;
* linear probe: standardised features, logistic regression, C chosen on held-out train rows;
* few-shot: ``shots`` rows per class, seeds ``0..seeds-1``, mean and population std;
* retrieval: test queries against the train gallery, mAP and mAP@R;
* clustering: k-means (k = the test split's classes) on the test rows, seeds ``0..seeds-1``
  (5 by default), NMI, ARI and Hungarian-matched cluster accuracy, mean and population std;
* combinations: each column alone, then embedding + gradients added one at a time;
* segmentation (dense tables, :func:`evaluate_segmentation`): HummingBird's memory bank
  of train patches and cross-attention label transfer, mIoU.
"""
from __future__ import annotations

from fungi_ops._lazy import lazy_exports

# Public names and the modules that define them, imported on first use (PEP 562): the
# pipeline's writers read and write dense tables through fungi_ops.dense_table, which needs
# fungi_ops.eval.io and .dense_io alone; importing every task here (scikit-learn, matplotlib,
# scipy) cost each write worker 155 MiB and 2 s (measured).
_EXPORTS = {
    "ClusteringScores": "fungi_ops.eval.clustering",
    "cluster_accuracy": "fungi_ops.eval.clustering",
    "clustering_scores": "fungi_ops.eval.clustering",
    "kmeans": "fungi_ops.eval.clustering",
    "PreparedFeatures": "fungi_ops.eval.combinations",
    "feature_combinations": "fungi_ops.eval.combinations",
    "prepare_features": "fungi_ops.eval.combinations",
    "EvalInputError": "fungi_ops.eval.errors",
    "EvalWarning": "fungi_ops.eval.errors",
    "few_shot_indices": "fungi_ops.eval.fewshot",
    "FEATURE_COLUMNS": "fungi_ops.eval.io",
    "FeatureTable": "fungi_ops.eval.io",
    "check_compatible": "fungi_ops.eval.io",
    "load_feature_table": "fungi_ops.eval.io",
    "shared_ids": "fungi_ops.eval.io",
    "knn_classify": "fungi_ops.eval.knn",
    "knn_search": "fungi_ops.eval.knn",
    "knn_vote": "fungi_ops.eval.knn",
    "LinearProbeResult": "fungi_ops.eval.linear",
    "linear_probe": "fungi_ops.eval.linear",
    "PCAProjection": "fungi_ops.eval.pca",
    "fit_pca": "fungi_ops.eval.pca",
    "TASKS": "fungi_ops.eval.protocol",
    "evaluate": "fungi_ops.eval.protocol",
    "CombinationResult": "fungi_ops.eval.report",
    "EvalReport": "fungi_ops.eval.report",
    "MetricSummary": "fungi_ops.eval.report",
    "format_markdown": "fungi_ops.eval.report",
    "write_report": "fungi_ops.eval.report",
    "RetrievalResult": "fungi_ops.eval.retrieval",
    "retrieval_metrics": "fungi_ops.eval.retrieval",
    "SegmentationReport": "fungi_ops.eval.segmentation",
    "evaluate_segmentation": "fungi_ops.eval.segmentation",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
