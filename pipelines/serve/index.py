"""One committed version of a feature output, held for queries: its rows, its faiss indexes, its featurizer.

:func:`load_version` reads the manifest and the data files of exactly one committed state
(the folder's header or the table's version is read before and after; a commit in between
starts the read again), builds one index per served feature combination, and the
featurizer of the version's spec. A replica holds a :class:`ServedVersion` and replaces it
whole (one attribute assignment) when :func:`commit_point` says a night committed: a
request takes the version once and uses it for everything it answers, so no response
mixes two.

The vectors indexed are those ``fungi eval`` compares: each block L2-normalised,
concatenated, normalised again (:func:`fungi_ops.eval.combinations.unit_concatenation`);
the inner product is their cosine. Up to ``exact_rows`` rows the index is exact
(``IndexFlatIP``); above, an inverted file (``IndexIVFFlat``, ``sqrt(n)`` lists trained on 40 rows
each, :data:`DEFAULT_NPROBE` of them searched) whose
recall@10 against the exact search is measured on a sample of the rows when it is built.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from fungi_ops.errors import ConfigError
from fungi_ops.eval.combinations import combination_name, unit_concatenation
from fungi_ops.eval.io import FEATURE_COLUMNS, FeatureTable, load_feature_table
from pipelines.formats.base import OutputTable
from pipelines.formats.table import LakeTable
from pipelines.manifest import Manifest, read_header

FUNGI = "fungi"  # the name of the concatenation of every feature column, in requests and --features
DEFAULT_EXACT_ROWS = 1_000_000
RECALL_QUERIES = 256  # rows of the output that query the IVF index and the exact search to measure its recall
DEFAULT_NPROBE = 32
_READ_ATTEMPTS = 5


def commit_point(output: OutputTable) -> Any:
    """What changes when the output commits, read cheaply at any size: a folder's header
    (its version and the run moving files in), a table's latest version."""
    if isinstance(output, LakeTable):
        return output.latest_version()
    header = read_header(output.root) or {}
    return header.get("version"), (header.get("pending") or {}).get("run_id")


def resolve_combinations(names: Sequence[str], available: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """``--features`` entries (``fungi``, or columns joined by ``+``) -> their columns, in :data:`FEATURE_COLUMNS` order."""
    combos: dict[str, tuple[str, ...]] = {}
    for name in names:
        if name == FUNGI:
            columns = [c for c in FEATURE_COLUMNS if c in available]
        else:
            parts = name.split("+")
            unknown = [p for p in parts if p not in available]
            if unknown or not parts:
                raise ConfigError(
                    f"--features {name!r}: the output has no column {unknown[0]!r}; it has {', '.join(available)} "
                    f"(or '{FUNGI}', all of them)"
                )
            columns = [c for c in FEATURE_COLUMNS if c in parts]
        combos[combination_name(columns) if name != FUNGI else FUNGI] = tuple(columns)
    return combos


class VectorIndex:
    """Inner-product search over unit rows: exact up to ``exact_rows``, IVF above (see the module doc)."""

    def __init__(self, rows: np.ndarray, *, exact_rows: int = DEFAULT_EXACT_ROWS, nprobe: int = DEFAULT_NPROBE,
                 seed: int = 0) -> None:
        import faiss

        count, dim = rows.shape
        self.rows, self.dim = count, dim
        self.recall_at_10: float | None = None
        started = time.perf_counter()
        if count <= exact_rows:
            self.kind = "exact"
            self.index = faiss.IndexFlatIP(dim)
            self.index.add(rows)
        else:
            lists = max(1, int(math.sqrt(count)))
            self.kind = f"ivf{lists}"
            quantizer = faiss.IndexFlatIP(dim)
            self.index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(seed)
            sample = rows[np.sort(rng.choice(count, size=min(count, 40 * lists), replace=False))]
            self.index.train(sample)
            self.index.add(rows)
            self.index.nprobe = nprobe
            self.recall_at_10 = self._recall(rows, rng)
        self.build_s = time.perf_counter() - started

    def _recall(self, rows: np.ndarray, rng: np.random.Generator) -> float:
        """Mean share of the exact 10 nearest rows that the IVF search finds, over sampled rows as queries."""
        from fungi_ops.eval.knn import knn_search

        queries = rows[rng.choice(rows.shape[0], size=min(RECALL_QUERIES, rows.shape[0]), replace=False)]
        k = min(10, rows.shape[0])
        _, exact = knn_search(queries, rows, k, device="cpu")
        _, found = self.index.search(queries, k)
        return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(exact.tolist(), found.tolist())]))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(similarities, row indices)``, ``(n, k)`` each, best first; ``k`` at most the row count.

        A request's few rows are searched on one thread: faiss's OpenMP team waits for cores
        that the replica's torch threads and other requests keep busy (on 2 busy cores, 2
        threads against 1: 1,070 against 430 ms exact over 200k x 1,152 rows, 40-65 against
        0.3 ms over 20k x 96). The setting is this thread's alone (OpenMP keeps one per
        thread), so an index built meanwhile in the following thread keeps every core.
        """
        import faiss

        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, self.rows))
        finally:
            faiss.omp_set_num_threads(threads)

    def describe(self) -> str:
        """One line for the log and ``/spec``."""
        recall = f", recall@10 {self.recall_at_10:.3f} vs exact on {RECALL_QUERIES} sampled rows" if self.recall_at_10 is not None else ""
        return f"{self.kind} inner product over {self.rows} rows x {self.dim} in {self.build_s:.1f} s{recall}"


@dataclass
class ServedVersion:
    """One committed state of the output, ready to answer: never changed once built."""

    version: str  # a folder's manifest version, a Delta version, an Iceberg snapshot id
    run_id: str | None
    manifest: Manifest
    ids: np.ndarray
    kept: pa.Table  # the output's kept columns, row-aligned with ids
    dims: dict[str, int]
    indexes: dict[str, VectorIndex]  # --features name -> index
    combos: dict[str, tuple[str, ...]]
    classes: np.ndarray | None = None  # the label column's classes (sorted, as fungi eval encodes them)
    codes: np.ndarray | None = None  # each row's class index
    featurizer: Any = None  # pipelines.serve.engine.ServingFeaturizer of the version's spec
    point: Any = None  # commit_point() when it was read
    notes: list[str] = field(default_factory=list)

    @property
    def spec_hash(self) -> str:
        return self.manifest.spec_hash

    def unit_rows(self, features: dict[str, np.ndarray], name: str) -> np.ndarray:
        """Query vectors of combination ``name`` from feature columns (as the index's rows are made)."""
        return unit_rows(features, self.combos[name])


def unit_rows(features: dict[str, np.ndarray], columns: Sequence[str]) -> np.ndarray:
    """``(rows, sum of dims)`` unit concatenation of feature matrices, as ``fungi eval`` makes it."""
    table = FeatureTable(ids=np.arange(len(features[columns[0]])), features={c: features[c] for c in columns})
    return unit_concatenation(table, columns)


def read_state(output: OutputTable, version: int | None) -> tuple[Any, str, Manifest]:
    """``(commit point, version name, manifest)`` of the current state, or of ``version`` of a table."""
    if isinstance(output, LakeTable):
        number, manifest = output.committed_version(version)
        return number, str(number), manifest
    if version is not None:
        raise ConfigError(f"--version: {output.uri} is a Parquet folder, which keeps no versions; serve a Delta or Iceberg output to pin one")
    manifest = output.read_manifest()
    if manifest is None:
        raise ConfigError(f"{output.uri} is not a fungi output (no manifest)")
    return commit_point(output), str(manifest.version), manifest


def load_version(output: OutputTable, *, version: int | None, label_column: str | None, features: Sequence[str],
                 exact_rows: int, make_featurizer: Callable[[Manifest], Any] | None,
                 previous: ServedVersion | None = None) -> ServedVersion:
    """Read one committed state and build its indexes (and its featurizer, unless ``previous`` has one of the same spec)."""
    for _ in range(_READ_ATTEMPTS):
        point, name, manifest = read_state(output, version)
        read_version = point if isinstance(output, LakeTable) else None
        table, kept = output.read_files(
            lambda files: _read_rows(output, files, label_column, manifest), read_version,
        )
        if isinstance(output, LakeTable) or commit_point(output) == point:
            break
    else:
        raise ConfigError(f"{output.uri} was committed to during each of {_READ_ATTEMPTS} reads; try again later")
    combos = resolve_combinations(features, list(table.features))
    indexes = {}
    for combo, columns in combos.items():
        indexes[combo] = VectorIndex(unit_concatenation(table, columns), exact_rows=exact_rows)
    classes = codes = None
    if label_column is not None:
        classes, codes = np.unique(table.labels, return_inverse=True)
    same_state = previous is not None and (previous.spec_hash, previous.manifest.setup_artifact) == (
        manifest.spec_hash, manifest.setup_artifact)  # an --overwrite may draw new negatives under the same spec
    if same_state and previous.featurizer is not None:
        featurizer = previous.featurizer
    else:
        featurizer = make_featurizer(manifest) if make_featurizer is not None else None
    run_id = manifest.runs[-1].run_id if manifest.runs else None
    return ServedVersion(name, run_id, manifest, table.ids, kept, table.dims, indexes, combos, classes,
                         codes.astype(np.int64) if codes is not None else None, featurizer, point)


def _read_rows(output: OutputTable, files: list[str] | None, label_column: str | None,
               manifest: Manifest) -> tuple[FeatureTable, pa.Table]:
    """The feature table (ids, vectors, labels) and the kept columns of one state's files, row-aligned."""
    if files is None:
        raise ConfigError(f"{output.uri} is not a fungi output")
    root = output.root
    if not files:
        raise ConfigError(f"{output.uri} has no rows with features to serve")
    table = load_feature_table(root.uri, label_column=label_column, files=files, filesystem=root.filesystem())
    keep = list(manifest.input.get("keep_columns", []))
    kept = pads.dataset(files, filesystem=root.filesystem(), format="parquet").to_table(columns=keep) if keep else pa.table({})
    return table, kept
