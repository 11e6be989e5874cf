"""Evaluation of FUNGI features: k-NN, linear probe, few-shot and retrieval, as in the paper.

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
* combinations: each column alone, then embedding + gradients added one at a time;
* segmentation (dense tables, :func:`evaluate_segmentation`): HummingBird's memory bank
  of train patches and cross-attention label transfer, mIoU.
"""
from fungi_ops.eval.combinations import PreparedFeatures, feature_combinations, prepare_features
from fungi_ops.eval.errors import EvalInputError, EvalWarning
from fungi_ops.eval.fewshot import few_shot_indices
from fungi_ops.eval.io import FEATURE_COLUMNS, FeatureTable, check_compatible, load_feature_table
from fungi_ops.eval.knn import knn_classify, knn_search, knn_vote
from fungi_ops.eval.linear import LinearProbeResult, linear_probe
from fungi_ops.eval.pca import PCAProjection, fit_pca
from fungi_ops.eval.protocol import TASKS, evaluate
from fungi_ops.eval.report import CombinationResult, EvalReport, MetricSummary, format_markdown, write_report
from fungi_ops.eval.retrieval import RetrievalResult, retrieval_metrics
from fungi_ops.eval.segmentation import SegmentationReport, evaluate_segmentation

__all__ = [
    "FEATURE_COLUMNS",
    "TASKS",
    "CombinationResult",
    "EvalInputError",
    "EvalReport",
    "EvalWarning",
    "FeatureTable",
    "LinearProbeResult",
    "MetricSummary",
    "PCAProjection",
    "PreparedFeatures",
    "RetrievalResult",
    "SegmentationReport",
    "check_compatible",
    "evaluate",
    "evaluate_segmentation",
    "feature_combinations",
    "few_shot_indices",
    "fit_pca",
    "format_markdown",
    "knn_classify",
    "knn_search",
    "knn_vote",
    "linear_probe",
    "load_feature_table",
    "prepare_features",
    "retrieval_metrics",
    "write_report",
]
