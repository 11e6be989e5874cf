"""Per-image cost of dense FUNGI against its forward-only floor, its parts, and the actor's memory.

One run prints, side by side:

1. per image size (default 224 and 448 px), on the same random-init timm ViT and the same
   synthetic scenes, interleaved and median of the repeats, wall and process CPU time:

   * ``floor``: the no-grad forward of the dense view (the whole image at that size), in
     the engine's own forward chunks; no dense FUNGI can be cheaper;
   * ``dense``: :meth:`DenseFeaturizer.featurize` (views, forward, support search, loss,
     backward to the target layer, per-patch projection);
   * its parts, each timed alone: ``views``, ``support search`` (one faiss search per
     image), ``projection`` (rank-one gradients of every patch, projected);
   * ``dense + write``: featurize, Arrow columns and a Parquet file of the batch, whose
     peak RSS growth is the actor's per-batch memory;
2. writing 512-px grids (1,024 patches x 768 floats, embedding and gradient) of a batch:
   peak RSS growth against the size of the features themselves;
3. the support index: exact against IVF search, ms per image and recall of the 2 nearest.

The support has ``--support-size`` patches (default 102,400, the reference's) from
synthetic scenes, every patch of ``support_size / patches`` images, so that it builds in
seconds. On a shared machine the CPU-time ratios are the trustworthy ones.

CPU (ViT-Tiny/16, fp32, 4 images in one batch; about 4 minutes on 2 cores)::

    python benchmarks/bench_dense.py

GPU (ViT-B/16, bf16, 256 images in batches of 32; the support search stays on the CPU)::

    python benchmarks/bench_dense.py --device cuda
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
from bench_engine import Clock, PeakMemory, _proc_status_kib, batches  # noqa: E402

from fungi_ops import FeaturizerSpec, parse_objectives  # noqa: E402
from fungi_ops.dense import DenseFeaturizer  # noqa: E402
from fungi_ops.dense_table import dense_batch_columns, write_dense_parquet  # noqa: E402
from fungi_ops.neighbours import NeighbourIndex  # noqa: E402
from fungi_ops.synthetic_scenes import make_scene  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--model", default=None, help="timm ViT (default: vit_tiny_patch16_224 on CPU, vit_base_patch16_224 on CUDA)")
    parser.add_argument("--sizes", default="224,448", help="image sides, comma-separated (default: %(default)s)")
    parser.add_argument("--images", type=int, default=None, help="images per timed repeat (default: 4 on CPU, 256 on CUDA)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per featurize call (default: 4 on CPU, 32 on CUDA)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per method (default: %(default)s)")
    parser.add_argument("--support-size", type=int, default=102400, help="support patches (default: %(default)s)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--projection-dim", type=int, default=None, help="size of the gradient feature (default: the embedding size)")
    parser.add_argument("--threads", type=int, default=None, help="torch (and faiss) CPU threads (default: torch's choice)")
    parser.add_argument("--write-images", type=int, default=32, help="512-px grids written in the write section (0: skip)")
    parser.add_argument("--index-sizes", default="4096,102400", help="support sizes of the index section ('' to skip)")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.model = args.model or ("vit_base_patch16_224" if cuda else "vit_tiny_patch16_224")
    args.images = args.images or (256 if cuda else 4)
    args.batch_size = args.batch_size or (32 if cuda else 4)
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    return args


def build(args: argparse.Namespace, size: int, device: torch.device) -> tuple[DenseFeaturizer, float]:
    """The featurizer at ``size`` px with a support of every patch of synthetic scenes; (it, setup seconds)."""
    patches = (size // 16) ** 2
    params = f"image_size={size};support_size={args.support_size};support_patches_per_image={patches}"
    spec = FeaturizerSpec(
        model=f"timm:{args.model}", modality="image", weights="random", precision=args.precision,
        objectives=parse_objectives(f"dense:{params}"), projection_dim=args.projection_dim,
    )
    featurizer = DenseFeaturizer(spec, device=device)
    rows = featurizer.spec.setup_rows
    started = time.perf_counter()
    featurizer.setup([make_scene(5000 + i, size=size)[0] for i in range(rows)], [f"support{i}" for i in range(rows)], batch_size=16)
    return featurizer, time.perf_counter() - started


def engine_section(args: argparse.Namespace, size: int, device: torch.device) -> list[str]:
    featurizer, setup_s = build(args, size, device)
    samples = [make_scene(i, size=size)[0] for i in range(args.images)]
    keys = [f"img{i}" for i in range(args.images)]
    chunks = list(zip(batches(samples, args.batch_size), batches(keys, args.batch_size)))
    tokens_count = featurizer.tokens.prefix + featurizer.patches
    d_in, d_out = featurizer.tap.layer.in_features, featurizer.tap.layer.out_features
    scratch = Path(tempfile.mkdtemp(prefix="bench_dense_"))

    def floor(clock: Clock) -> None:
        for batch, _ in chunks:
            pixels = featurizer.views(batch)
            with torch.no_grad(), featurizer._autocast(), clock.measure():
                featurizer._forward_tokens(pixels)

    def dense(clock: Clock) -> None:
        for batch, batch_keys in chunks:
            with clock.measure():
                featurizer.featurize(batch, batch_keys)

    def views(clock: Clock) -> None:
        for batch, _ in chunks:
            with clock.measure():
                featurizer.views(batch)

    def search(clock: Clock) -> None:
        for batch, batch_keys in chunks:
            with torch.no_grad(), featurizer._autocast():
                tokens = featurizer._forward_tokens(featurizer.views(batch))
            with clock.measure():
                featurizer._negatives(tokens, batch_keys)

    def projection(clock: Clock) -> None:
        for batch, _ in chunks:
            gen = torch.Generator(device=device).manual_seed(0)
            x = torch.randn((len(batch), tokens_count, d_in), generator=gen, device=device, dtype=featurizer.compute_dtype)
            g = torch.randn((len(batch), tokens_count, d_out), generator=gen, device=device)
            with clock.measure():
                featurizer._patch_gradients([x], [g])

    def dense_and_write(clock: Clock) -> None:
        for index, (batch, batch_keys) in enumerate(chunks):
            with clock.measure():
                result = featurizer.featurize(batch, batch_keys)
                table = pa.table({"id": result.keys, **dense_batch_columns(result)})
                write_dense_parquet(table, scratch / f"part-{index}.parquet")

    methods: dict[str, Callable[[Clock], None]] = {
        "floor": floor, "dense": dense, "views": views, "support search": search, "projection": projection,
        "dense + write": dense_and_write,
    }
    memory = PeakMemory(device)
    walls: dict[str, list[float]] = {name: [] for name in methods}
    cpus: dict[str, list[float]] = {name: [] for name in methods}
    peaks = dict.fromkeys(methods, 0.0)
    for _ in range(args.repeats):
        for name, method in methods.items():
            memory.reset()
            method(Clock(device))  # untimed: warms the allocator, measures memory
            peaks[name] = max(peaks[name], memory.peak_mib())
            clock = Clock(device)
            method(clock)
            walls[name].append(clock.wall)
            cpus[name].append(clock.cpu)
    wall = {name: statistics.median(v) / args.images * 1000 for name, v in walls.items()}
    cpu = {name: statistics.median(v) / args.images * 1000 for name, v in cpus.items()}
    config = featurizer.config
    process_peak = _proc_status_kib("VmHWM") / 1024 if device.type == "cpu" else float("nan")
    lines = [
        f"### {size} px: {featurizer.grid[0]}x{featurizer.grid[1]} patches + {featurizer.tokens.prefix} prefix token(s), "
        f"support {featurizer.support.size} patches ({featurizer.support.kind}, {config.index_probe} lists probed), "
        f"setup {setup_s:.1f} s; projection {tuple(featurizer.projection.matrix.shape)} "
        f"{featurizer.projection.matrix.numel() * featurizer.projection.matrix.element_size() / 2**20:.0f} MiB; "
        f"process peak RSS so far {process_peak:.0f} MiB",
        "",
        f"| method | ms/image (wall) | wall vs floor | CPU ms/image | CPU vs floor | {memory.label} |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in methods:
        lines.append(
            f"| {name} | {wall[name]:.1f} | {wall[name] / wall['floor']:.2f}x | {cpu[name]:.1f} | "
            f"{cpu[name] / cpu['floor']:.2f}x | {peaks[name]:.0f} |"
        )
    rest = wall["dense"] - wall["floor"] - wall["views"] - wall["support search"] - wall["projection"]
    lines += [
        "",
        f"dense / floor at {size} px: {wall['dense'] / wall['floor']:.2f} wall, {cpu['dense'] / cpu['floor']:.2f} CPU "
        f"(target <= 2 at 224 px); projection alone {cpu['projection'] / cpu['floor']:.2f}x, support search "
        f"{cpu['support search'] / cpu['floor']:.2f}x, the rest (loss, backward, views) {rest / wall['floor']:.2f}x of the floor (wall)",
        "",
    ]
    del featurizer
    gc.collect()
    return lines


def write_section(args: argparse.Namespace) -> list[str]:
    """Arrow columns and Parquet of ``--write-images`` grids of 1,024 patches x 768 floats, twice (embedding, gradient)."""
    from fungi_ops.dense import DenseBatch

    count, patches, dim = args.write_images, 1024, 768
    rng = np.random.default_rng(0)
    features = {name: rng.standard_normal((count, patches, dim), dtype=np.float32) for name in ("embedding", "grad_dense")}
    batch = DenseBatch([f"img{i}" for i in range(count)], (32, 32), features)
    feature_mib = sum(v.nbytes for v in features.values()) / 2**20
    memory = PeakMemory(torch.device("cpu"))
    with tempfile.TemporaryDirectory() as scratch:
        memory.reset()
        started = time.perf_counter()
        table = pa.table({"id": batch.keys, **dense_batch_columns(batch)})
        columns_mib = memory.peak_mib()
        write_dense_parquet(table, Path(scratch) / "part.parquet")
        seconds = time.perf_counter() - started
        peak = memory.peak_mib()
        size = os.path.getsize(Path(scratch) / "part.parquet") / 2**20
    return [
        f"### writing {count} grids of 512 px (1,024 patches x 768 floats, embedding + gradient)",
        "",
        f"features {feature_mib:.0f} MiB; Arrow columns over them: +{columns_mib:.0f} MiB peak RSS; with the Parquet write: "
        f"+{peak:.0f} MiB peak RSS, {seconds:.2f} s, file {size:.0f} MiB",
        "",
    ]


def index_section(args: argparse.Namespace, dim: int) -> list[str]:
    lines = [
        f"### support search, {dim} dims, 197 queries (one 224-px image), recall of the 2 nearest against exact",
        "",
        "| support patches | flat ms/image | lists | ivf build s | ivf ms/image | ivf recall@2 | ivf-sq8 build s | ivf-sq8 ms/image | ivf-sq8 recall@2 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rng = np.random.default_rng(0)
    for size in [int(s) for s in args.index_sizes.split(",") if s]:
        centres = rng.normal(size=(256, dim)).astype(np.float32)
        vectors = centres[rng.integers(0, 256, size)] + 0.7 * rng.normal(size=(size, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        queries = vectors[rng.integers(0, size, 197)] + 0.3 * rng.normal(size=(197, dim)).astype(np.float32)
        flat = NeighbourIndex.build(vectors, "flat", seed=0)
        exact = flat.search(queries, 2)[1]
        cells = [f"{_search_ms(flat, queries):.1f}"]
        for kind in ("ivf", "ivf-sq8"):
            started = time.perf_counter()
            index = NeighbourIndex.build(vectors, kind, seed=0)
            build_s = time.perf_counter() - started
            found = index.search(queries, 2)[1]
            recall = np.mean([len(set(a) & set(b)) / 2 for a, b in zip(exact, found)])
            if kind == "ivf":
                cells.append(str(index._ivf.nlist))
            cells += [f"{build_s:.1f}", f"{_search_ms(index, queries):.1f}", f"{recall:.3f}"]
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _search_ms(index: NeighbourIndex, queries: np.ndarray) -> float:
    """Median of 5 searches of the 2 nearest, after one untimed."""
    index.search(queries, 2)
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        index.search(queries, 2)
        runs.append(time.perf_counter() - started)
    return statistics.median(runs) * 1000


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = f": {torch.cuda.get_device_name(device)}" if device.type == "cuda" else f" ({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)"
    print(f"# dense FUNGI benchmark, {device.type}{name}")
    print(
        f"timm:{args.model} (random init), {args.precision}, {args.images} synthetic scenes per repeat in batches of "
        f"{args.batch_size}, median of {args.repeats} interleaved repeats (each timed run right after an untimed one); "
        f"torch {torch.__version__}\n"
    )
    for size in [int(s) for s in args.sizes.split(",") if s]:
        lines = engine_section(args, size, device)
        print("\n".join(lines), flush=True)
    if args.write_images:
        print("\n".join(write_section(args)), flush=True)
    if args.index_sizes:
        import timm

        dim = timm.create_model(args.model, pretrained=False, num_classes=0).num_features
        print("\n".join(index_section(args, dim)), flush=True)
    if device.type == "cpu":
        print(f"process peak RSS: {_proc_status_kib('VmHWM') / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
