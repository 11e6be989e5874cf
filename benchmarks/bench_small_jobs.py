"""Small jobs end to end: fungivision, the in-process Featurizer and `fungi featurize`, same work.

The job people run first: a folder of a few dozen images, SimCLR negatives from another
file. Each method runs in its own process, one after the other, interleaved per size:

* ``fungivision``: 0.0.2's ``FUNGIWrapper`` (setup on the negatives, then the queries in
  batches of 16), heads copied from ours so that both compute the same thing;
* ``in-process``: one ``fungi_ops.Featurizer`` with every core to torch (load, negatives,
  queries in batches of 16);
* ``featurize``: the CLI with its defaults, ``--setup-from`` the negatives file; at these
  sizes (at most ``--in-process-rows``, 256) it runs its stages in its own process;
* ``featurize-ray``: the same command with ``--in-process-rows 0``: the stages on a local
  Ray (setup task, actor pool), as a larger job runs;
* ``nothing-to-do``: the command again with ``--incremental`` and nothing to do.

Same data everywhere: random 375x500 RGB PNGs, a random-init ViT-Tiny/16 saved as
safetensors, ``--objectives kl,dino,simclr`` (64 negatives x 49 SimCLR views), fp32.
Reported per run: wall time, CPU time of the process and its children, and CPU
utilisation = CPU time / wall / cores. ``--demo`` also times `fungi demo`'s featurize.

    python benchmarks/bench_small_jobs.py                      # 32 and 128 images (about 40 min on 2 cores)
    python benchmarks/bench_small_jobs.py --queries 32 --methods featurize,nothing-to-do
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL = "timm:vit_tiny_patch16_224"
OBJECTIVES = "kl,dino,simclr"
NEGATIVES = 64
BATCH = 16
METHODS = ("fungivision", "in-process", "featurize", "featurize-ray", "nothing-to-do")


def build_data(root: Path, queries: int) -> None:
    """Random images (queries and negatives) as Parquet, and the random ViT-Tiny as safetensors."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)

    def pngs(count: int) -> list[bytes]:
        out = []
        for _ in range(count):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(buffer, format="PNG")
            out.append(buffer.getvalue())
        return out

    (root / "negatives").mkdir(parents=True, exist_ok=True)
    (root / f"queries{queries}").mkdir(parents=True, exist_ok=True)
    if not (root / "negatives" / "part-0.parquet").exists():
        pq.write_table(pa.table({"id": [f"n{i}" for i in range(NEGATIVES)], "image": pngs(NEGATIVES)}),
                       root / "negatives" / "part-0.parquet")
    pq.write_table(pa.table({"id": [f"q{i}" for i in range(queries)], "image": pngs(queries)}),
                   root / f"queries{queries}" / "part-0.parquet")
    weights = root / "vit_tiny.safetensors"
    if not weights.exists():
        import timm
        import torch
        from safetensors.torch import save_file

        torch.manual_seed(0)
        save_file(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).state_dict(), str(weights))


def images(path: Path) -> tuple[list[str], list[bytes]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return table.column("id").to_pylist(), table.column("image").to_pylist()


def run_in_process(root: Path, queries: int) -> dict:
    """One Featurizer in this process: load, negatives (the pipeline's draw), queries."""
    import torch

    from fungi_ops import Featurizer, FeaturizerSpec, parse_objectives
    from fungi_ops.seeding import setup_order

    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    spec = FeaturizerSpec(model=MODEL, modality="image", weights=str(root / "vit_tiny.safetensors"),
                          objectives=parse_objectives(OBJECTIVES), precision="fp32")
    featurizer = Featurizer(spec, device="cpu")
    loaded = time.perf_counter()
    ids, payloads = images(root / "negatives" / "part-0.parquet")
    order = setup_order(spec.seed, ids)[: featurizer.spec.setup_rows]
    featurizer.setup([featurizer.decode(payloads[i]) for i in order], [ids[i] for i in order])
    negatives = time.perf_counter()
    ids, payloads = images(root / f"queries{queries}" / "part-0.parquet")
    for start in range(0, len(ids), BATCH):
        featurizer.featurize_payloads(payloads[start : start + BATCH], ids[start : start + BATCH])
    done = time.perf_counter()
    return {"detail": f"load {loaded - started:.1f} s, negatives {negatives - loaded:.1f} s, "
                      f"{queries} images {done - negatives:.1f} s"}


def run_fungivision(root: Path, queries: int) -> dict:
    """fungivision 0.0.2: setup on the negatives, then the queries, on a copy of our model and heads."""
    import warnings

    import torch
    from PIL import Image

    warnings.filterwarnings("ignore", category=FutureWarning)
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_engine import build_fungivision

    from fungi_ops import Featurizer, FeaturizerSpec, parse_objectives

    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    spec = FeaturizerSpec(model=MODEL, modality="image", weights=str(root / "vit_tiny.safetensors"),
                          objectives=parse_objectives(OBJECTIVES), precision="fp32")
    engine = Featurizer(spec, device="cpu")  # for the model and the heads to copy
    wrapper = build_fungivision(engine, torch.device("cpu"), torch.empty(0))
    del engine

    class Negatives(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.payloads = images(root / "negatives" / "part-0.parquet")[1]

        def __len__(self) -> int:
            return len(self.payloads)

        def __getitem__(self, index: int) -> tuple:
            return Image.open(io.BytesIO(self.payloads[index])).convert("RGB"), 0

    loaded = time.perf_counter()
    wrapper.setup(Negatives())
    negatives = time.perf_counter()
    payloads = images(root / f"queries{queries}" / "part-0.parquet")[1]
    for start in range(0, len(payloads), BATCH):
        wrapper([Image.open(io.BytesIO(p)).convert("RGB") for p in payloads[start : start + BATCH]])
    done = time.perf_counter()
    return {"detail": f"load {loaded - started:.1f} s, setup {negatives - loaded:.1f} s, "
                      f"{queries} images {done - negatives:.1f} s"}


def featurize_command(root: Path, queries: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "featurize", "--input", str(root / f"queries{queries}"),
            "--output", str(root / f"features{queries}"), "--modality", "image", "--model", MODEL,
            "--weights", str(root / "vit_tiny.safetensors"), "--objectives", OBJECTIVES, "--precision", "fp32",
            "--setup-from", str(root / "negatives"), *extra]


class ProcessCPU:
    """CPU seconds of this process's descendants while it runs (the command, and Ray's
    processes under it), sampled every 0.1 s: ``RUSAGE_CHILDREN`` misses Ray's workers,
    which the command does not wait for."""

    def __init__(self) -> None:
        import threading

        self.seconds: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        for process in psutil.Process().children(recursive=True):
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            self.seconds[process.pid] = times.user + times.system

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self._sample()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return sum(self.seconds.values())


def timed(command: list[str]) -> tuple[float, float, str]:
    """(wall s, CPU s of the processes it started, output)."""
    cpu = ProcessCPU()
    started = time.perf_counter()
    done = subprocess.run(command, cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    seconds = cpu.stop()
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return wall, seconds, done.stdout


def measure(method: str, root: Path, queries: int) -> dict:
    if method in ("fungivision", "in-process"):
        wall, cpu, out = timed([sys.executable, __file__, "--inside", method, "--root", str(root),
                                "--queries", str(queries)])
        detail = json.loads(out.strip().splitlines()[-1])["detail"]
    else:
        extra = {"nothing-to-do": ("--incremental",), "featurize-ray": ("--overwrite", "--in-process-rows", "0")
                 }.get(method, ("--overwrite",))
        wall, cpu, out = timed(featurize_command(root, queries, *extra))
        detail = next(line for line in out.splitlines() if line.startswith("fungi: rows in"))
    return {"wall": wall, "cpu": cpu, "detail": detail}


def measure_demo() -> dict:
    """`fungi demo`'s featurize step (its own timing line), in a fresh workdir."""
    with tempfile.TemporaryDirectory() as work:
        wall, cpu, out = timed([sys.executable, "-m", "pipelines.cli", "demo", "--workdir", work])
    line = next((l for l in out.splitlines() if "fungi: rows in" in l), out.strip().splitlines()[-1])
    return {"wall": wall, "cpu": cpu, "detail": line}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", default="32,128", help="comma-separated numbers of query images")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--demo", action="store_true", help="also time `fungi demo` (default settings)")
    parser.add_argument("--root", help="data folder (default: a temporary one)")
    parser.add_argument("--inside", choices=["fungivision", "in-process"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        run = run_fungivision if args.inside == "fungivision" else run_in_process
        print(json.dumps(run(Path(args.root), int(args.queries))))
        return
    root = Path(args.root or tempfile.mkdtemp(prefix="fungi-bench-small-"))
    cores = os.cpu_count() or 1
    methods = [m.strip() for m in args.methods.split(",")]
    print(f"# small jobs: {MODEL} (random, safetensors), {OBJECTIVES}, fp32, {NEGATIVES} negatives, {cores} cores")
    print("| images | method | wall s | CPU s | CPU utilisation | detail |")
    print("|---:|---|---:|---:|---:|---|")
    results: dict[tuple[int, str], dict] = {}
    for queries in (int(q) for q in args.queries.split(",")):
        build_data(root, queries)
        for method in methods:
            result = results[queries, method] = measure(method, root, queries)
            print(f"| {queries} | {method} | {result['wall']:.1f} | {result['cpu']:.1f} | "
                  f"{result['cpu'] / result['wall'] / cores:.0%} | {result['detail']} |", flush=True)
        if {"featurize", "in-process"} <= set(methods):
            gap = results[queries, "featurize"]["wall"] - results[queries, "in-process"]["wall"]
            print(f"  {queries} images: fungi featurize - in-process = {gap:+.1f} s")
        for method in ("featurize", "featurize-ray"):
            if {method, "fungivision"} <= set(methods):
                ratio = results[queries, "fungivision"]["wall"] / results[queries, method]["wall"]
                print(f"  {queries} images: fungivision / {method} = {ratio:.2f}x "
                      f"(targets for featurize: >= 1.1 at 32, >= 1.4 at 128)")
        if "nothing-to-do" in methods:
            print(f"  nothing to do: {results[queries, 'nothing-to-do']['wall']:.1f} s (target <= 20 s)")
    if args.demo:
        demo = measure_demo()
        print(f"| demo | fungi demo | {demo['wall']:.1f} | {demo['cpu']:.1f} | {demo['cpu'] / demo['wall'] / cores:.0%} | "
              f"{demo['detail']} |")


if __name__ == "__main__":
    main()
