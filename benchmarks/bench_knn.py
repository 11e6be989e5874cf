"""k-NN evaluation at data-lake scale: 1M train rows on one machine, no N x N matrix.

Builds ``--train-rows`` (default 1,000,000) synthetic feature rows in ``--classes``
Gaussian clusters (``embedding`` and ``grad_kl``, ``--dim`` each) and ``--test-rows``
queries, then runs :func:`fungi_ops.eval.evaluate` (task ``knn``, k=20, every feature
combination) on the CPU. Prints the wall time per combination, the peak RSS of the
process against the size of the data itself, and what a dense score matrix would need,
plus the accuracy (the clusters are separable, so it must be close to 100%).

    python benchmarks/bench_knn.py [--train-rows 1000000] [--test-rows 2000] [--dim 192]
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from fungi_ops.eval import FeatureTable, evaluate, format_markdown  # noqa: E402


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def clustered(rows: int, dim: int, centres: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``centres[labels]`` plus unit Gaussian noise, float32, written chunk by chunk."""
    out = np.empty((rows, dim), dtype=np.float32)
    for start in range(0, rows, 1 << 16):
        stop = min(rows, start + (1 << 16))
        out[start:stop] = centres[labels[start:stop]] + rng.standard_normal((stop - start, dim), dtype=np.float32)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-rows", type=int, default=1_000_000)
    parser.add_argument("--test-rows", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=192, help="dimension of each feature block")
    parser.add_argument("--classes", type=int, default=100)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    started = time.perf_counter()
    # one set of class centres per feature block, shared by both splits
    centres = {name: rng.standard_normal((args.classes, args.dim), dtype=np.float32) * 0.6 for name in ("embedding", "grad_kl")}
    splits = {}
    for rows, source in ((args.train_rows, "train"), (args.test_rows, "test")):
        labels = rng.integers(0, args.classes, rows)
        splits[source] = FeatureTable(
            ids=np.arange(rows).astype(str),
            features={name: clustered(rows, args.dim, c, labels, rng) for name, c in centres.items()},
            labels=labels,
            source=source,
            label_column="label",
        )
    data_gib = sum(a.nbytes for t in splits.values() for a in t.features.values()) / 2**30
    built = time.perf_counter() - started
    rss_before = peak_rss_gib()

    started = time.perf_counter()
    report = evaluate(splits["train"], splits["test"], task="knn", device="cpu")
    elapsed = time.perf_counter() - started
    rss_after = peak_rss_gib()

    print(format_markdown(report))
    dense_gib = args.test_rows * args.train_rows * 4 / 2**30
    print(
        f"\n{args.train_rows:,} train x {args.test_rows:,} test rows, {args.classes} classes, "
        f"2 blocks of {args.dim} dims; data {data_gib:.2f} GiB (built in {built:.0f} s)"
    )
    print(f"evaluate(task='knn'): {elapsed:.1f} s for {len(report.results)} combinations on the CPU")
    print(
        f"peak RSS {rss_after:.2f} GiB (before evaluating {rss_before:.2f} GiB); a dense test x train score "
        f"matrix alone would be {dense_gib:.1f} GiB, a train x train one {args.train_rows**2 * 4 / 2**40:.1f} TiB"
    )


if __name__ == "__main__":
    main()
