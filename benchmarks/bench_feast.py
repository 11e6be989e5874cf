"""Feast hand-off of a FUNGI output: repo writing, materialization, online lookup, vector search.

Writes a synthetic output shaped like the demo's features (``--rows`` rows, ``embedding``
384 + ``grad_kl`` 384 + ``grad_simclr`` 384, clustered like real features, one history
night), then measures with the real Feast and sqlite-vec, in one process:

* ``fungi feast``: the repository and the FUNGI concatenation vectors (1152 dims);
* ``materialize``: both feature views into the SQLite online store;
* ``get_online_features`` for 100 ids (embedding + both gradients; median of the repeats);
* ``retrieve_online_documents_v2`` top 10 over ``embedding`` and over ``fungi`` (median
  latency) and recall@10 against brute-force cosine on the same vectors, queries being
  stored vectors plus noise.

    python benchmarks/bench_feast.py [--rows 1000] [--queries 50]
    python benchmarks/bench_feast.py --output fungi_demo/features   # a real output, e.g. `fungi demo`'s
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--output", help="a feature output written by `fungi featurize` (default: a synthetic one)")
    args = parser.parse_args()

    from fungi_outputs import SyntheticOutput, make_spec

    from pipelines.feast.definitions import load_definitions
    from pipelines.feast.repo import write_feast_repo
    from pipelines.feast.vectors import fungi_vectors, vector_matrix

    import pyarrow.parquet as pq

    work = Path(tempfile.mkdtemp(prefix="bench_feast_"))
    now = datetime.now(timezone.utc)
    if args.output:
        root, current = Path(args.output), pq.read_table(args.output)
    else:
        synthetic = SyntheticOutput(work / "features", make_spec(embed_dim=384, projection_dim=384), labels=18)
        synthetic.night(now - timedelta(hours=1), [f"row{i:05d}" for i in range(args.rows)])
        root, current = synthetic.root, synthetic.current
    ids = current.column("id").to_pylist()
    columns = [name for name in current.column_names if name == "embedding" or name.startswith("grad_")]

    started = time.perf_counter()
    update = write_feast_repo(str(root), work / "repo")
    repo_s = time.perf_counter() - started
    started = time.perf_counter()
    from feast import FeatureStore

    import_s = time.perf_counter() - started
    store = FeatureStore(repo_path=str(work / "repo"))
    started = time.perf_counter()
    store.apply(load_definitions(work / "repo"))
    apply_s = time.perf_counter() - started
    started = time.perf_counter()
    store.materialize(now - timedelta(days=1), now)
    materialize_s = time.perf_counter() - started

    view, concat_view = update.feature_view, update.fungi_view
    rng = np.random.default_rng(0)
    rows = [{"id": i} for i in rng.choice(ids, min(100, len(ids)), replace=False)]
    features = [f"{view}:{name}" for name in columns]
    lookups = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        store.get_online_features(features=features, entity_rows=rows)
        lookups.append(time.perf_counter() - t)

    report = []
    for name, feature, vectors in [
        ("embedding", f"{view}:embedding", vector_matrix(current.column("embedding"))),
        ("fungi", f"{concat_view}:fungi", fungi_vectors(current, columns)),
    ]:
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        picks = rng.choice(len(ids), min(args.queries, len(ids)), replace=False)
        noise = rng.normal(size=(len(picks), vectors.shape[1])) * 0.3 / np.sqrt(vectors.shape[1] / 384)
        queries = vectors[picks] + noise
        hits, latency = [], []
        for query in queries.astype(np.float32):
            truth = set(np.asarray(ids)[np.argsort(-(unit @ (query / np.linalg.norm(query))))[:10]])
            t = time.perf_counter()
            found = store.retrieve_online_documents_v2(features=[feature], query=query.tolist(), top_k=10).to_dict()
            latency.append(time.perf_counter() - t)
            hits.append(len(truth & set(found["id"])) / 10)
        report.append((name, vectors.shape[1], float(np.mean(hits)), 1000 * float(np.median(latency))))

    dims = " + ".join(f"{name} {current.schema.field(name).type.list_size}" for name in columns)
    print(f"{len(ids)} rows of {args.output or 'a synthetic output'}, {dims}, work dir {work}")
    print(f"fungi feast (repo + FUNGI vectors): {repo_s:.2f} s; import feast {import_s:.1f} s; apply {apply_s:.2f} s")
    print(f"materialize 2 views ({len(ids)} rows each) into SQLite: {materialize_s:.2f} s")
    print(f"get_online_features, {len(rows)} ids x {len(columns)} vector features: median {1000 * np.median(lookups):.1f} ms "
          f"(p90 {1000 * np.quantile(lookups, 0.9):.1f} ms, {args.repeats} repeats)")
    for name, dim, recall, ms in report:
        print(f"vector search top-10 over {name} ({dim}): recall@10 {recall:.3f}, median {ms:.1f} ms "
              f"({len(picks)} queries)")


if __name__ == "__main__":
    main()
