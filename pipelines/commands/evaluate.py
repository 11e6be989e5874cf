"""Evaluate FUNGI feature tables the way the paper does and write a report.

Reads two feature tables written by `fungi featurize` (a Parquet file or directory,
local or s3://bucket/prefix, with ?endpoint_override=host:port&scheme=http for an
S3-compatible store; files and folders starting with "_" or "." are skipped; an output of
`fungi featurize` is read through its manifest: exactly one committed state), checks that
they come from the same featurizer spec and have the same feature dimensions, and
evaluates every feature combination in one call:

  embedding, grad_kl, grad_dino, grad_simclr            (each alone, if present)
  embedding+grad_kl, embedding+grad_kl+grad_dino, ...   (gradients added in that order)

Each feature block is L2-normalised, blocks are concatenated, optionally reduced by a
PCA fitted on the train table only (--pca), and L2-normalised again (cosine similarity).

Tasks:
  knn        k-NN accuracy, k=20, similarity-weighted vote exp(cos/0.07) as in DINO
             (--vote majority for one vote per neighbour); k above the train size is
             clamped to it with a warning.
  linear     logistic regression on standardised features, C picked on a stratified
             held-out part of the train table (--c-grid), accuracy on the test table.
  retrieval  test rows query the train rows; a train row is relevant when its label is
             equal; reports mAP and mAP@R.
  clustering k-means (scikit-learn, k-means++) with k = the number of classes of the
             test table, on the test rows; the train table only fits the PCA (--pca) and
             needs no label column. One run per seed (--seeds, default 5), NMI, ARI and
             cluster accuracy (Hungarian matching of clusters to classes), mean ± std.

  segmentation
             in-context segmentation of dense (per-patch) tables, the HummingBird
             protocol: a memory bank of --memory-size train patches (102400; a
             seeded, rare-class-first share of every train image) with the class
             histogram of their pixels (--mask-column: PNG bytes, one class id per
             pixel, 255 ignored), the k=30 nearest memory patches of each test patch,
             their labels weighted by softmax(cos/0.02), upsampled to the mask; mIoU
             over the classes, per class too. Also writes example.png (a test image,
             its truth and each prediction; the image from --image-column if kept).

One output holding both splits (a kept `split` column): --train OUT --train-where split=train
--test OUT --test-where split=test (the filter is pushed down to the Parquet scan). A warning
counts the test ids that are also in train (scored against themselves).

Few-shot: --shots N draws N train rows per class (stratified) for each of --seeds S
draws (seeds 0..S-1) and reports mean ± std over the draws.

The markdown table is printed to stdout; with --out DIR, report.md, report.json (every
number, as fractions in [0, 1]) and report.png (bar chart with the spread) are written.
Bad input (missing label or feature column, different specs or dimensions, NaN
features, a class with fewer than N examples for N-shot, a test table of one class or
with no more rows than classes for clustering) exits with status 2 and a
one-line "error: ..." message.

Examples:
  fungi eval --train out/train --test out/test --label-column label --out eval_report
  fungi eval --train delta:lake/feats --train-where split=train --test delta:lake/feats --test-where split=test
  fungi eval --train s3://bucket/feats/train --test s3://bucket/feats/test \\
      --features embedding,grad_kl --pca 768 --shots 5 --seeds 3 --task knn
  fungi eval --task clustering --train out/train --test out/test --pca 256 --seeds 10
  fungi eval --task segmentation --train dense/train --test dense/test --mask-column mask --out seg_report
"""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any, Callable

HELP = "evaluate feature tables (k-NN, linear probe, retrieval, clustering, segmentation; few-shot, PCA) and write a report"

# Copies of fungi_ops.eval constants, so that `fungi --help` does not import torch
# (tests/test_eval_cli.py checks that they agree).
_TASKS = ("knn", "linear", "retrieval", "clustering", "segmentation")
_VOTES = ("weighted", "majority")
_FEATURES = ("embedding", "grad_kl", "grad_dino", "grad_simclr", "grad_dense")
_C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
_TASK_DEFAULTS = {"segmentation": (30, 0.02)}  # (k, temperature); every other task: _KNN_DEFAULTS
_KNN_DEFAULTS = (20, 0.07)
_CLUSTERING_SEEDS = 5  # --seeds default of --task clustering (k-means runs), for --help; every other task: 1
_MEMORY_SIZE = 102400
_INDEXES = ("auto", "flat", "ivf", "ivf-sq8")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``fungi eval`` options."""
    data = parser.add_argument_group("data")
    data.add_argument(
        "--train", required=True, metavar="PATH",
        help="train feature table (Parquet file or directory, local or s3://): k-NN neighbours, "
        "probe training rows, retrieval gallery; the PCA is fitted on it (clustering uses it for nothing else)",
    )
    data.add_argument(
        "--test", required=True, metavar="PATH",
        help="test feature table, same format and spec as --train: scored by every task, clustered by clustering",
    )
    data.add_argument(
        "--train-where", type=_where, metavar="COLUMN=VALUE",
        help="take the train rows whose kept column equals VALUE (e.g. split=train): train and test from one output",
    )
    data.add_argument(
        "--test-where", type=_where, metavar="COLUMN=VALUE",
        help="take the test rows whose kept column equals VALUE (e.g. split=test)",
    )
    data.add_argument(
        "--version", type=int, metavar="N",
        help="read both tables as of this Delta version or Iceberg snapshot id (time travel; default: current)",
    )
    data.add_argument(
        "--catalog",
        help="Iceberg catalog of iceberg: outputs, as for fungi featurize (default: the SQL catalog in $FUNGI_WAREHOUSE)",
    )
    data.add_argument(
        "--label-column", default="label", metavar="NAME", help="column holding the class labels (default: %(default)s)"
    )
    data.add_argument(
        "--features", type=_feature_list, metavar="A,B,...",
        help=f"comma-separated feature columns to evaluate, among {','.join(_FEATURES)} "
        "(default: every one present in both tables)",
    )

    protocol = parser.add_argument_group("protocol")
    protocol.add_argument("--task", choices=_TASKS, default="knn", help="evaluation task (default: %(default)s)")
    protocol.add_argument(
        "--pca", type=_positive_int, metavar="DIM",
        help="reduce every combination to DIM dimensions with a PCA fitted on the train table (default: no PCA)",
    )
    protocol.add_argument(
        "--shots", type=_positive_int, metavar="N", help="few-shot: use N train rows per class (default: all rows)"
    )
    protocol.add_argument(
        "--seeds", type=_positive_int, metavar="S",
        help="few-shot: number of random draws, clustering: of k-means runs (seeds 0..S-1), averaged, with "
        f"their std (default: 1; {_CLUSTERING_SEEDS} for clustering)",
    )
    protocol.add_argument(
        "--k", type=_positive_int, help="neighbours per query (default: 20; 30 for segmentation)"
    )
    protocol.add_argument(
        "--vote", choices=_VOTES, default="weighted",
        help="k-NN vote: 'weighted' sums exp(cosine/temperature) per class, 'majority' counts neighbours "
        "(default: %(default)s)",
    )
    protocol.add_argument(
        "--temperature", type=_positive_float,
        help="temperature of the weighted vote (default: 0.07), or of segmentation's cross-attention (default: 0.02)",
    )
    protocol.add_argument(
        "--c-grid", type=_float_list, default=_C_GRID, metavar="C,C,...",
        help="linear probe: inverse regularisation strengths tried on held-out train rows "
        "(default: 0.001,0.01,0.1,1,10,100)",
    )

    segmentation = parser.add_argument_group("segmentation (dense tables)")
    segmentation.add_argument(
        "--mask-column", default="mask", metavar="NAME",
        help="column of label masks: PNG bytes, one class id per pixel, 255 ignored (default: %(default)s)",
    )
    segmentation.add_argument(
        "--image-column", default="image", metavar="NAME",
        help="column of the encoded images, drawn in example.png when the table kept it (default: %(default)s)",
    )
    segmentation.add_argument(
        "--memory-size", type=_positive_int, default=_MEMORY_SIZE, metavar="N",
        help="train patches in the memory bank, memory-size // train images from each (default: %(default)s)",
    )
    segmentation.add_argument(
        "--knn-index", choices=_INDEXES, default="auto",
        help="neighbour search over the memory bank: auto (exact up to 4096 patches, else ivf-sq8), flat (exact), "
        "ivf, ivf-sq8 (approximate, faiss; 32 lists probed) (default: %(default)s)",
    )
    segmentation.add_argument(
        "--seed", type=int, default=0, help="seed of the memory bank's patch sampling (default: %(default)s)"
    )

    output = parser.add_argument_group("output")
    output.add_argument(
        "--out", metavar="DIR", help="write report.md, report.json and report.png into DIR (default: print only)"
    )
    output.add_argument(
        "--device", default="auto", help="torch device for k-NN, PCA and retrieval: auto, cpu, cuda, cuda:1, ... "
        "(default: %(default)s = cuda if available)",
    )


def run(args: argparse.Namespace) -> int:
    """Load both tables, evaluate, print the table and write the report; 0 on success, 2 on bad input."""
    from fungi_ops.eval import (
        EvalInputError, evaluate, evaluate_segmentation, load_feature_table, shared_ids, write_report,
    )
    from fungi_ops.eval.device import resolve_device
    from fungi_ops.eval.protocol import check_options, default_seeds

    k, temperature = task_defaults(args.task)
    k = args.k if args.k is not None else k
    temperature = args.temperature if args.temperature is not None else temperature
    seeds = args.seeds if args.seeds is not None else default_seeds(args.task)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            check_options(
                task=args.task, pca=args.pca, shots=args.shots, seeds=seeds, k=k,
                vote=args.vote, temperature=temperature,
            )
            resolve_device(args.device)
            if args.task == "segmentation" and (args.train_where or args.test_where):
                raise EvalInputError("--train-where and --test-where take rows of per-row tables; "
                                     "--task segmentation reads dense tables: featurize each split to its own output")
            if args.task == "segmentation":
                from fungi_ops.eval.dense_io import DenseReader

                train, test = (read_table_files(path, lambda source, files, fs: DenseReader(
                    source, files=files, filesystem=fs), version=args.version, catalog=args.catalog)
                    for path in (args.train, args.test))
                report = evaluate_segmentation(
                    train, test, mask_column=args.mask_column, image_column=args.image_column,
                    features=args.features, memory_size=args.memory_size, k=k, temperature=temperature,
                    index=args.knn_index, seed=args.seed,
                )
            else:
                # Clustering scores the test rows alone: the train table needs no label column.
                train_labels = None if args.task == "clustering" else args.label_column
                tables = [
                    read_table_files(path, lambda source, files, fs, labels=labels, where=where: load_feature_table(
                        source, label_column=labels, features=args.features, files=files, filesystem=fs,
                        where=where), version=args.version, catalog=args.catalog)
                    for path, labels, where in ((args.train, train_labels, args.train_where),
                                                (args.test, args.label_column, args.test_where))
                ]
                shared = shared_ids(*tables) if args.task != "clustering" else 0
                if shared:
                    warnings.warn(
                        f"{shared} of {tables[1].n_rows} test ids are also in train: those rows are scored against "
                        "themselves (one output holding both splits: --train-where split=train --test-where split=test)"
                    )
                report = evaluate(
                    *tables, task=args.task, features=args.features, pca=args.pca, shots=args.shots,
                    seeds=seeds, k=k, vote=args.vote, temperature=temperature,
                    c_grid=args.c_grid, device=args.device,
                )
        except EvalInputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    print(report.to_markdown(), end="")
    if args.out:
        try:
            paths = write_report(report, args.out)
        except OSError as exc:
            print(f"error: cannot write the report to {args.out}: {exc}", file=sys.stderr)
            return 2
        print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 0


def read_table_files(path: str, read: Callable[[str, list[str] | None, Any], Any], *, version: int | None = None,
                     catalog: str | None = None) -> Any:
    """``read(source, files, filesystem)`` of a feature table: a fungi output's data files of exactly
    one committed state (the current one, or ``version`` of a Delta or Iceberg table; even right
    after a run was killed in its commit), else (``files`` None) every Parquet file under ``path``.

    ``path`` is a folder, ``delta:PATH`` or ``iceberg:NS.TABLE`` (in ``catalog``). A URI with pyarrow
    options (``?endpoint_override=...``) is read as a plain table.
    """
    from fungi_ops.eval import EvalInputError
    from fungi_ops.errors import FungiError
    from pipelines.formats import open_output

    if "?" in path:
        if version is not None:
            raise EvalInputError(f"--version needs a Delta or Iceberg table; {path} is read as a plain Parquet table")
        return read(path, None, None)
    try:
        table = open_output(path, catalog=catalog)
        root = table.root
        return table.read_files(lambda files: read(root.uri if files is not None else path, files,
                                                   root.filesystem() if files is not None else None), version)
    except EvalInputError:
        raise
    except (FungiError, OSError, ValueError) as exc:
        raise EvalInputError(f"cannot read the fungi output {path}: {exc}") from exc


def task_defaults(task: str) -> tuple[int, float]:
    """``(k, temperature)`` used when ``--k`` / ``--temperature`` are not given."""
    return _TASK_DEFAULTS.get(task, _KNN_DEFAULTS)


def _show_warning(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    """Warnings as one ``warning: ...`` line, without the source location meant for developers."""
    print(f"warning: {message}", file=sys.stderr)


def _parsed(convert: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        return value

    return parse


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError(value)
    return value


_positive_int = _parsed(lambda text: int(_positive(int(text))), "a positive integer")
_positive_float = _parsed(lambda text: _positive(float(text)), "a positive number")
_float_list = _parsed(lambda text: tuple(_positive(float(v)) for v in text.split(",")), "comma-separated positive numbers")


def _where(text: str) -> tuple[str, str]:
    """``COLUMN=VALUE`` -> ``(column, value)``."""
    column, equals, value = text.partition("=")
    if not equals or not column.strip():
        raise argparse.ArgumentTypeError(f"expected COLUMN=VALUE (e.g. split=test), got {text!r}")
    return column.strip(), value


def _feature_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in _FEATURES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated names among {','.join(_FEATURES)}, got {text!r}"
        )
    return names
