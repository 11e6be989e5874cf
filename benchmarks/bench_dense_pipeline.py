"""Peak memory of `fungi featurize` writing whole dense grids: each stage's processes, per image size.

For each size (default 448 and 512 px) one dense job (``--objectives dense:image_size=S``,
timm ViT-Tiny/16 with a random init, fp32 on the CPU, one actor) featurizes ``--images``
synthetic scenes of that size, its support drawn from the same scenes. While it runs, the
RSS of every Ray worker is sampled by stage (:class:`bench_pipeline.StageMemory`): the
featurize actor while it loads (model, projection, support) and while it featurizes, the
decode and write tasks, the finalize task. Printed per size: the grid, the features of
one batch (what an actor holds and hands on), the job's wall time, each process's RSS when
first seen in a stage and its peak there, and the output file (size, row groups).

RSS counts the object-store pages a process maps (a block read zero-copy). A task worker
keeps the heap of the tasks it ran before (torch, a decode, the support's encoding): its
growth within a stage is the stage's cost.

    python benchmarks/bench_dense_pipeline.py [--sizes 448,512] [--images 32] [--batch-size 16]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import pyarrow.parquet as pq  # noqa: E402
from bench_pipeline import StageMemory  # noqa: E402

from fungi_ops.synthetic_scenes import scene_table  # noqa: E402

STAGES = {
    "featurize actor, loading": "FeaturizeActor)).__init__",  # model, projection, support
    "featurize actor": "FeaturizeActor",
    "decode task": "decode_batch",
    "write task": "write_batch",
    "finalize task": "finalize_source",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_tiny_patch16_224", help="timm ViT, random init (default: %(default)s)")
    parser.add_argument("--sizes", default="448,512", help="image sides, comma-separated (default: %(default)s)")
    parser.add_argument("--images", type=int, default=32, help="scenes featurized per size (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per featurize call (default: %(default)s)")
    parser.add_argument("--support-size", type=int, default=2048, help="support patches (default: %(default)s)")
    return parser.parse_args(argv)


def run_size(args: argparse.Namespace, size: int, work: Path) -> list[str]:
    """One dense job at ``size`` px; its lines of the report."""
    from pipelines.job import FeaturizeConfig, run_featurize

    source, output = work / f"in{size}", work / f"out{size}"
    source.mkdir()
    pq.write_table(scene_table(args.images, size=size), source / "scenes.parquet", row_group_size=8)
    per_image = max(1, args.support_size // args.images)
    config = FeaturizeConfig(
        input=str(source), output=str(output), modality="image", model=f"timm:{args.model}", weights="random",
        objectives=f"dense:image_size={size};support_size={args.support_size};support_patches_per_image={per_image}",
        precision="fp32", batch_size=args.batch_size, actors=(1, 1),
    )
    with StageMemory(STAGES, interval=0.1) as memory:
        summary = run_featurize(config)
    spec = json.loads((output / "_fungi_manifest.json").read_text())["spec"]
    (data,) = output.glob("scenes-*.parquet")
    side = pq.read_table(data, columns=["grid_rows"]).column(0)[0].as_py()
    batch_mib = args.batch_size * side * side * (spec["embed_dim"] + spec["projection_dim"]) * 4 / 2**20
    lines = [
        f"### {size} px: {side}x{side} patches, {args.images} images in batches of {args.batch_size}",
        "",
        f"features of one batch {batch_mib:.0f} MiB (embedding {spec['embed_dim']} + grad_dense {spec['projection_dim']} "
        f"floats a patch); job wall {summary.wall_s:.0f} s, {summary.rows_written} rows written; output "
        f"{data.stat().st_size / 2**20:.0f} MiB in {pq.ParquetFile(data).metadata.num_row_groups} row groups",
        "",
        "| stage | process | RSS when first seen in it, MiB | peak RSS, MiB |",
        "|---|---:|---:|---:|",
    ]
    for (stage, pid), peak in sorted(memory.peaks.items(), key=lambda item: (item[0][1], item[0][0])):
        lines.append(f"| {stage} | {pid} | {memory.starts[(stage, pid)] / 2**20:.0f} | {peak / 2**20:.0f} |")
    return [*lines, ""]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from pipelines.ray_runtime import init_ray

    init_ray(num_cpus=os.cpu_count())
    print(f"# dense pipeline memory, timm:{args.model} (random init), fp32, CPU ({os.cpu_count()} cores), 1 actor\n")
    with tempfile.TemporaryDirectory() as work:
        for size in [int(s) for s in args.sizes.split(",") if s]:
            print("\n".join(run_size(args, size, Path(work))), flush=True)


if __name__ == "__main__":
    main()
