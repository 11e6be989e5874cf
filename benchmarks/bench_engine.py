"""Per-image cost of the FUNGI engine against its forward-only floor and fungivision.

Everything is measured side by side in one process, on the same random-init timm
model, the same 375x500 images and the same objectives (KL + DINO + SimCLR with their
defaults), so that the ratios are meaningful even on a busy machine:

* ``floor``: the no-grad forward passes of the very views the engine uses (1 eval +
  12 DINO + 49 SimCLR = 62 per image), i.e. what any FUNGI implementation must pay;
* ``fungi``: :meth:`Featurizer.featurize` on decoded images (views, forward, backward to
  the target layer, per-sample gradients, projection);
* ``fungivision``: the reference implementation (``FUNGIWrapper``) on PIL images.

Methods run interleaved (floor, fungi, fungivision, floor, ...) and the median of the
repeats is reported, so a load spike on a shared machine hits every method alike; each
timed run directly follows an untimed run of the same method (which also measures its
memory), so the allocator is as warm as in a worker that featurizes batch after batch.
Wall and process CPU time are both reported. SimCLR negatives are random latents (64
images x 49 views), the same for both implementations: setup is a one-off cost and not
what is measured.

CPU (targets: fungi <= 1.15x the floor and >= 1.4x faster than fungivision)::

    python benchmarks/bench_engine.py

GPU (ViT-B/16, bf16; target >= 250 images/s on an H200; no network needed)::

    python benchmarks/bench_engine.py --device cuda
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

# Run from a checkout without installing it (e.g. on a lent GPU machine).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fungi_ops import Featurizer, FeaturizerSpec, parse_objectives  # noqa: E402

IMAGE_HEIGHT, IMAGE_WIDTH = 375, 500
NEGATIVE_IMAGES = 64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--model", default=None, help="timm model (default: vit_tiny_patch16_224 on CPU, vit_base_patch16_224 on CUDA)")
    parser.add_argument("--images", type=int, default=None, help="images per timed repeat (default: 4 on CPU, 512 on CUDA)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per featurize call (default: 4 on CPU, 32 on CUDA)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per method (default: 2)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument(
        "--fungivision",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time the reference fungivision (default: on for CPU, off for CUDA)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.model = args.model or ("vit_base_patch16_224" if cuda else "vit_tiny_patch16_224")
    args.images = args.images or (512 if cuda else 4)
    args.batch_size = args.batch_size or (32 if cuda else 4)
    args.repeats = args.repeats or 2
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.fungivision = (not cuda) if args.fungivision is None else args.fungivision
    return args


# -- memory -------------------------------------------------------------------------
class PeakMemory:
    """Peak memory of one method: the CUDA allocator's peak, or the RSS growth on the CPU.

    On Linux, before each method, freed heap pages go back to the OS (``malloc_trim``) and
    the RSS high-water mark is reset (``/proc/self/clear_refs``), so each method reports
    its own peak above the memory the process already held. Elsewhere only the process'
    cumulative ``ru_maxrss`` is available, which the report says.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.resettable = device.type != "cuda" and _reset_rss_peak()
        self.baseline_kib = 0
        try:
            self._malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except OSError:
            self._malloc_trim = None

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        if self._malloc_trim is not None:
            self._malloc_trim(0)
        if self.resettable:
            _reset_rss_peak()
            self.baseline_kib = _proc_status_kib("VmRSS")

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.resettable:
            return (_proc_status_kib("VmHWM") - self.baseline_kib) / 1024
        scale = 1 if platform.system() == "Darwin" else 1024  # bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20

    @property
    def label(self) -> str:
        if self.device.type == "cuda":
            return "CUDA max_memory_allocated, MiB"
        if self.resettable:
            return "peak RSS growth, MiB"
        return "process peak RSS (cumulative), MiB"


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _proc_status_kib("VmHWM") > 0
    except OSError:
        return False


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


# -- timing -------------------------------------------------------------------------
class Clock:
    """Wall and process CPU seconds of the timed regions of one method run.

    CPU time is printed too because on a shared machine other processes' load inflates
    wall time but hardly this process' CPU time.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.wall = 0.0
        self.cpu = 0.0

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.wall += time.perf_counter() - wall
        self.cpu += time.process_time() - cpu


def batches(items: list, size: int) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)]


# -- the three methods --------------------------------------------------------------
def build_engine(args: argparse.Namespace, device: torch.device) -> Featurizer:
    spec = FeaturizerSpec(
        model=f"timm:{args.model}",
        modality="image",
        weights="random",
        objectives=parse_objectives("kl,dino,simclr"),
        precision=args.precision,
        seed=0,
    )
    return Featurizer(spec, device=device)


def random_negatives(engine: Featurizer) -> torch.Tensor:
    """SimCLR negatives as the setup would store them: head outputs of 64 images x 49 views."""
    simclr = engine.objectives["simclr"]
    views = engine.groups[[g.kind for g in engine.groups].index("contrastive")].count
    gen = torch.Generator().manual_seed(1)
    return torch.randn(NEGATIVE_IMAGES * views, simclr.config.latent_dim, generator=gen)


def build_fungivision(engine: Featurizer, device: torch.device, negatives: torch.Tensor) -> Any:
    """The reference wrapper on an identical copy of the model, heads copied from ours."""
    from fungivision.config import DINOConfig, KLConfig, SimCLRConfig
    from fungivision.wrapper import FUNGIWrapper

    model = copy.deepcopy(engine.backbone.model)
    for module in model.modules():  # drop the engine's (inactive) gradient tap from the copy
        module._forward_hooks.clear()
    kl = engine.objectives["kl"].config
    wrapper = FUNGIWrapper(
        model=model,
        target_layer=engine.spec.target_layer,
        device=device,
        input_dim=engine.adapter.settings.input_size,
        use_fp16=engine.compute_dtype == torch.bfloat16,
        extractor_configs=[KLConfig(temperature=kl.temperature), DINOConfig(), SimCLRConfig()],
    )
    kl_ext, dino_ext, simclr_ext = wrapper.extractors
    with torch.no_grad():
        kl_ext.projection_head.load_state_dict(engine.objectives["kl"].head.state_dict())
        dino_ext.projection_head.load_state_dict(engine.objectives["dino"].head.state_dict())
        dino_ext.teacher_projection.load_state_dict(engine.objectives["dino"].teacher_head.state_dict())
        simclr_ext.projection_head.load_state_dict(engine.objectives["simclr"].head.state_dict())
    simclr_ext.comparison_batch = negatives.to(device)
    return wrapper


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # fungivision's torch.cuda.amp calls
    warnings.filterwarnings("ignore", category=UserWarning)
    device = torch.device(args.device)

    start = time.perf_counter()
    engine = build_engine(args, device)
    setup_s = time.perf_counter() - start
    negatives = random_negatives(engine)
    engine.objectives["simclr"].set_negatives(negatives)

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (IMAGE_HEIGHT, IMAGE_WIDTH, 3), dtype=np.uint8) for _ in range(args.images)]
    keys = [f"img{i}" for i in range(args.images)]
    start = time.perf_counter()
    decoded = [engine.decode(array) for array in arrays]
    decode_s = time.perf_counter() - start
    chunks = list(zip(batches(decoded, args.batch_size), batches(keys, args.batch_size)))

    def run_floor(clock: Clock) -> None:
        with torch.no_grad(), engine._autocast():
            for samples, chunk_keys in chunks:
                views = engine.adapter.build_views(samples, chunk_keys, engine.groups, engine.spec.seed, device)
                with clock.measure():  # the forward passes alone, in the engine's own chunks
                    engine._embed(views)

    def run_one_pass_floor(clock: Clock) -> None:
        with torch.no_grad(), engine._autocast():
            for samples, chunk_keys in chunks:
                views = engine.adapter.build_views(samples, chunk_keys, engine.groups, engine.spec.seed, device)
                with clock.measure():  # all views of the batch in a single forward pass
                    engine.backbone.embed(views)

    def run_views(clock: Clock) -> None:
        with clock.measure():
            for samples, chunk_keys in chunks:
                engine.adapter.build_views(samples, chunk_keys, engine.groups, engine.spec.seed, device)

    def run_engine(clock: Clock) -> None:
        with clock.measure():
            for samples, chunk_keys in chunks:
                engine.featurize(samples, chunk_keys)

    methods: dict[str, Callable[[Clock], None]] = {"floor": run_floor, "fungi": run_engine, "fungi: views only": run_views}
    if device.type == "cpu":  # on accelerators the engine's forward is this single pass
        methods["floor, one pass per batch"] = run_one_pass_floor
    if args.fungivision:
        from PIL import Image

        reference = build_fungivision(engine, device, negatives)
        pil_chunks = batches([Image.fromarray(array) for array in arrays], args.batch_size)

        def run_fungivision(clock: Clock) -> None:
            with clock.measure():
                for images in pil_chunks:
                    reference(images)

        methods["fungivision"] = run_fungivision

    memory = PeakMemory(device)
    walls: dict[str, list[float]] = {name: [] for name in methods}
    cpus: dict[str, list[float]] = {name: [] for name in methods}
    peaks: dict[str, float] = {name: 0.0 for name in methods}
    for _ in range(args.repeats):
        for name, method in methods.items():
            # An untimed run first, which also measures memory; the timed run right after
            # finds the allocator warm, as a worker featurizing batch after batch does.
            memory.reset()
            method(Clock(device))
            peaks[name] = max(peaks[name], memory.peak_mib())
            clock = Clock(device)
            method(clock)
            walls[name].append(clock.wall)
            cpus[name].append(clock.cpu)

    per_image = {name: statistics.median(values) / args.images * 1000 for name, values in walls.items()}
    cpu_per_image = {name: statistics.median(values) / args.images * 1000 for name, values in cpus.items()}
    report(args, engine, device, per_image, cpu_per_image, peaks, memory, setup_s, decode_s)


def report(args, engine, device, per_image, cpu_per_image, peaks, memory, setup_s, decode_s) -> None:
    projection = engine.projection.matrix
    floor, ours = per_image["floor"], per_image["fungi"]
    name = f": {torch.cuda.get_device_name(device)}" if device.type == "cuda" else f" ({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)"
    print(f"# FUNGI engine benchmark, {device.type}{name}")
    print(
        f"timm:{args.model} (random init), target {engine.spec.target_layer}, {args.precision}, "
        f"{args.images} images of {IMAGE_WIDTH}x{IMAGE_HEIGHT} in batches of {args.batch_size}, "
        f"{sum(group.count for group in engine.groups)} views/image "
        f"({' + '.join(f'{group.count} {group.kind}' for group in engine.groups)}), "
        f"median of {args.repeats} interleaved repeats, each timed run right after an untimed one; torch {torch.__version__}"
    )
    print(
        f"projection {tuple(projection.shape)} {str(projection.dtype).replace('torch.', '')} on {projection.device}, "
        f"{projection.numel() * projection.element_size() / 2**20:.1f} MiB; engine construction {setup_s:.1f} s; "
        f"decode (on workers, not included below) {decode_s / args.images * 1000:.1f} ms/image"
    )
    print()
    print(f"| method | ms/image (wall) | images/s | wall vs floor | CPU ms/image | CPU vs floor | {memory.label} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for method in ("floor", "fungi", "fungi: views only", "floor, one pass per batch", "fungivision"):
        if method in per_image:
            wall, cpu = per_image[method], cpu_per_image[method]
            print(
                f"| {method} | {wall:.1f} | {1000 / wall:.2f} | {wall / floor:.3f}x | {cpu:.1f} | "
                f"{cpu / cpu_per_image['floor']:.3f}x | {peaks[method]:.0f} |"
            )
    print()
    print(f"fungi / floor: {ours / floor:.3f} wall, {cpu_per_image['fungi'] / cpu_per_image['floor']:.3f} CPU (target <= 1.15)")
    if "fungivision" in per_image:
        print(
            f"fungivision / fungi: {per_image['fungivision'] / ours:.2f}x wall, "
            f"{cpu_per_image['fungivision'] / cpu_per_image['fungi']:.2f}x CPU (target >= 1.4)"
        )
    if device.type == "cuda":
        print(f"fungi throughput: {1000 / ours:.1f} images/s (target >= 250 on an H200)")


if __name__ == "__main__":
    main()
