"""Evaluation report: the numbers, and their markdown, JSON and bar-chart renderings.

Metrics are stored as fractions in ``[0, 1]`` (JSON keeps them so, unrounded);
markdown and the chart show percentages. The spread is the population standard
deviation (``numpy.std``, ``ddof=0``) over few-shot or k-means seeds; it is 0 for a single run.
The chart is drawn on a bare :class:`~matplotlib.figure.Figure` (Agg), so writing a
report never changes the pyplot backend of a notebook.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

REPORT_FILES: dict[str, str] = {"markdown": "report.md", "json": "report.json", "png": "report.png"}
_TASK_TITLES = {
    "knn": "k-NN",
    "linear": "linear probe",
    "retrieval": "retrieval",
    "clustering": "clustering (k-means)",
    "segmentation": "segmentation (HummingBird)",
}


@dataclass(frozen=True)
class MetricSummary:
    """One metric over the runs (seeds) of a combination: mean, spread and every value."""

    mean: float
    std: float
    values: tuple[float, ...]

    @classmethod
    def from_values(cls, values: Sequence[float]) -> "MetricSummary":
        """Summarise per-run values (population std, 0 for a single run)."""
        array = np.asarray(values, dtype=np.float64)
        return cls(float(array.mean()), float(array.std()), tuple(float(v) for v in array))


@dataclass(frozen=True)
class CombinationResult:
    """Numbers of one feature combination.

    Attributes:
        name: display name, e.g. ``embedding+grad_kl``.
        columns: the feature columns combined.
        input_dim: dimension of the block concatenation.
        dim: dimension evaluated (after PCA).
        metrics: metric name -> summary over runs.
        details: per-run extra values, e.g. the linear probe's chosen C per seed.
        seconds: wall time spent on this combination.
    """

    name: str
    columns: tuple[str, ...]
    input_dim: int
    dim: int
    metrics: dict[str, MetricSummary]
    details: dict[str, list[Any]] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass(frozen=True)
class EvalReport:
    """Result of :func:`fungi_ops.eval.evaluate`: the settings and one row per combination.

    Attributes:
        task: ``"knn"``, ``"linear"``, ``"retrieval"``, ``"clustering"`` or ``"segmentation"``.
        metric_names: metrics of the task, in display order.
        settings: everything needed to reproduce or read the numbers (sources, row and
            class counts, spec hash, effective ``k``, PCA, shots, seeds, ...).
        results: one entry per combination, in the paper's order.
    """

    task: str
    metric_names: tuple[str, ...]
    settings: dict[str, Any]
    results: tuple[CombinationResult, ...]

    def result(self, name: str) -> CombinationResult:
        """The result of the combination called ``name`` (e.g. ``"embedding+grad_kl"``)."""
        for result in self.results:
            if result.name == name:
                return result
        raise KeyError(f"no combination {name!r}; have {', '.join(r.name for r in self.results)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary with every number."""
        return asdict(self)

    def to_markdown(self) -> str:
        """The settings summary and the results table as markdown."""
        return format_markdown(self)

    def figures(self) -> dict[str, Figure]:
        """Pictures written next to the chart as ``<name>.png`` (none here; segmentation draws an example)."""
        return {}


def format_markdown(report: EvalReport) -> str:
    """Markdown with a settings summary and a ``features | dim | metric (%)...`` table."""
    s = report.settings
    lines = [
        f"## FUNGI evaluation: {_TASK_TITLES.get(report.task, report.task)}",
        "",
        f"- train: `{s['train']['source']}` ({s['train']['rows']} rows); "
        f"test: `{s['test']['source']}` ({s['test']['rows']} rows); "
        f"{s['n_classes']} classes" + (f" from column `{s['label_column']}`" if s.get("label_column") else ""),
        f"- {_protocol_line(report)}",
        "",
        "| features | dim | " + " | ".join(f"{m} (%)" for m in report.metric_names) + " |",
        "|:--|--:|" + "--:|" * len(report.metric_names),
    ]
    for result in report.results:
        cells = [_percent(result.metrics[m]) for m in report.metric_names]
        lines.append(f"| {result.name} | {result.dim} | " + " | ".join(cells) + " |")
    if report.task == "segmentation":
        lines += ["", *_class_iou_table(report)]
    return "\n".join(lines) + "\n"


def _class_iou_table(report: EvalReport) -> list[str]:
    """Per-class IoU (%), one column per combination."""
    per_combo = [result.details["class_iou"][0] for result in report.results]
    classes = sorted({int(c) for ious in per_combo for c in ious})
    lines = [
        "| class | " + " | ".join(f"{r.name} IoU (%)" for r in report.results) + " |",
        "|--:|" + "--:|" * len(report.results),
    ]
    for c in classes:
        cells = [f"{100 * ious[str(c)]:.2f}" if str(c) in ious else "-" for ious in per_combo]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return lines


def plot_report(report: EvalReport) -> Figure:
    """Bar chart of every metric per combination, with the spread over seeds as error bars."""
    names = [r.name for r in report.results]
    n_metrics = len(report.metric_names)
    width = 0.8 / n_metrics
    x = np.arange(len(names))
    figure = Figure(figsize=(max(6.0, 1.3 * len(names)), 4.8), layout="constrained")
    axes = figure.subplots()
    for i, metric in enumerate(report.metric_names):
        means = [100 * r.metrics[metric].mean for r in report.results]
        stds = [100 * r.metrics[metric].std for r in report.results]
        bars = axes.bar(x + (i - (n_metrics - 1) / 2) * width, means, width, yerr=stds, capsize=4, label=metric)
        axes.bar_label(bars, fmt="%.1f", padding=2, fontsize=8)
    axes.set_xticks(x, [name.replace("+", "+\n") for name in names], fontsize=8)
    axes.set_ylabel("%")
    lowest = min(100 * (r.metrics[m].mean - r.metrics[m].std) for r in report.results for m in report.metric_names)
    axes.set_ylim(min(0.0, lowest - 5), 105)  # ARI below chance is negative
    axes.set_title(f"FUNGI {_TASK_TITLES.get(report.task, report.task)}: {_protocol_line(report)}", fontsize=9)
    if n_metrics > 1:
        axes.legend(fontsize=8)
    return figure


def write_report(report: EvalReport, out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.md``, ``report.json``, ``report.png`` and the report's :meth:`~EvalReport.figures` into ``out_dir``.

    ``out_dir`` is created if needed.

    Returns:
        ``{"markdown": path, "json": path, "png": path}`` plus one entry per figure
        (segmentation: ``"example"``, ``example.png``).
    """
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {kind: directory / name for kind, name in REPORT_FILES.items()}
    paths["markdown"].write_text(format_markdown(report))
    paths["json"].write_text(json.dumps(report.to_dict(), indent=2, default=_json_default) + "\n")
    plot_report(report).savefig(paths["png"], dpi=120)
    for name, figure in report.figures().items():
        paths[name] = directory / f"{name}.png"
        figure.savefig(paths[name], dpi=120)
    return paths


def _protocol_line(report: EvalReport) -> str:
    s = report.settings
    if report.task == "segmentation":
        return (
            f"memory bank of {s['memory_patches']} train patches (at most {s['patches_per_train_image']} per image), "
            f"k={s['k']}, cross-attention T={s['temperature']}, {s['index']} search; "
            f"mIoU over {len(s['class_ids'])} classes, ignore index {s['ignore_index']}"
        )
    if report.task == "clustering":
        runs = f"mean ± std over {len(s['seeds'])} seeds" if len(s["seeds"]) > 1 else "seed 0"
        pca = f"PCA {s['pca']} fitted on the train split" if s["pca"] is not None else "no PCA"
        return f"k-means on the test split, k={s['n_clusters']} (its classes); {pca}; {runs}"
    parts = []
    if report.task == "knn":
        parts.append(f"k={s['k']} ({s['vote']} vote" + (f", T={s['temperature']})" if s["vote"] == "weighted" else ")"))
    elif report.task == "linear":
        parts.append("logistic regression, C chosen on held-out train rows")
    parts.append(f"PCA {s['pca']}" if s["pca"] is not None else "no PCA")
    if s["shots"] is not None:
        parts.append(f"{s['shots']}-shot, mean ± std over {len(s['seeds'])} seeds")
    else:
        parts.append("full train split")
    return "; ".join(parts)


def _percent(summary: MetricSummary) -> str:
    if len(summary.values) == 1:
        return f"{100 * summary.mean:.2f}"
    return f"{100 * summary.mean:.2f} ± {100 * summary.std:.2f}"


def _json_default(value: Any) -> Any:
    """numpy scalars/arrays that may sit in settings or the spec -> plain JSON types."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")
