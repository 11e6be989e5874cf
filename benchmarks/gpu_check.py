"""The prepared device check: fungi on one GPU, every figure issue 19 asks for, in one run.

Parts, in the order they run (the most wanted first, so that a run cut short by its
budget still has them; a part that would start after ``--budget-s`` is skipped and listed):

1. ``engine``: :meth:`Featurizer.featurize` on random-init timm ViT-B/16 at 224 px with
   KL + DINO + SimCLR (62 views an image) and on a BERT-base-sized random text model
   with KL + SimCLR (128 tokens, 13 views a text), bf16 autocast then fp32, batches of
   32/64/128: rows/s, the forward-only floor of the same views in one no-grad pass,
   the ratio, peak CUDA memory; for bf16 also the smallest cosine similarity of a row's
   features to its fp32 features, per block;
2. ``pipeline``: ``fungi featurize`` (local Ray, one GPU actor, ``--batch-size auto``) over
   ~2,000 JPEGs in Parquet: end-to-end rows/s, the run record's steady rate, and GPU
   utilisation from ``nvidia-smi`` sampled between the first staged block and the end of
   the stream;
3. ``fungivision``: the reference implementation (its own loop) on the same images, model,
   heads and SimCLR negatives (:func:`bench_engine.build_fungivision`), bf16;
4. ``dense``: dense FUNGI on ViT-S/16 at 512 px (1,024 patches; support of 102,400 patches):
   images/s and peak memory (:func:`bench_dense.build`).

(the text rows of ``engine`` run last; ``--parts`` picks some, e.g. one device call's). A
part whose packages are missing (:data:`gpu_carry.PART_NEEDS`: not in the image, not
carried, no index reachable) is listed under ``failed`` with the reason that
``gpu_carry.py install`` wrote, also in ``--smoke``; a part that raises (out of memory)
is listed there too and the others still run, except in ``--smoke``, where it fails the
run. Each measurement is a fixed number of batches after one warm-up batch. The table is
printed and written as JSON to ``$OUT/gpu_check.json`` (``$OUT`` set) or
``benchmarks/gpu_check.json``, after every part. ``--smoke`` runs every part on the CPU
with tiny models and a handful of rows (tests/test_gpu_check.py), so the script cannot rot.

    bash benchmarks/gpu_check.sh            # on the GPU machine (installs, then runs this)
    python benchmarks/gpu_check.py --smoke  # anywhere
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from bench_dense import build as build_dense  # noqa: E402
from bench_engine import IMAGE_HEIGHT, IMAGE_WIDTH, Clock, PeakMemory, batches, build_engine, build_fungivision  # noqa: E402
from gpu_carry import PART_NEEDS, missing_modules, read_notes  # noqa: E402

from fungi_ops import Featurizer, FeaturizerSpec, parse_objectives  # noqa: E402
from fungi_ops.synthetic_scenes import make_scene  # noqa: E402

TARGETS = {"engine_images_per_s": 250.0, "pipeline_vs_engine": 0.9, "gpu_utilisation_pct": 85.0, "vs_fungivision": 3.0}
WORDS = ("the model reads a long sentence about rivers cities music history science light water stone "
         "people travel north while markets open early and scholars argue over old maps").split()


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What one run measures: the full check on a GPU, or tiny sizes for ``--smoke``."""

    image_model: str
    image_shape: tuple[int, int]
    text_layers: int
    text_hidden: int
    text_tokens: int
    batch_sizes: tuple[int, ...]
    timed_batches: dict[str, int]  # per precision
    fungivision_images: int
    pipeline_images: int
    pipeline_image_shape: tuple[int, int]
    pipeline_objectives: str
    dense_model: str
    dense_size: int
    dense_support: int
    dense_images: int
    dense_batch: int


FULL = Sizes(
    image_model="vit_base_patch16_224", image_shape=(IMAGE_HEIGHT, IMAGE_WIDTH), text_layers=12, text_hidden=768, text_tokens=128, batch_sizes=(32, 64, 128),
    timed_batches={"bf16": 3, "fp32": 2}, fungivision_images=32, pipeline_images=2000,
    pipeline_image_shape=(IMAGE_HEIGHT, IMAGE_WIDTH), pipeline_objectives="kl,dino,simclr",
    dense_model="vit_small_patch16_224", dense_size=512, dense_support=102400, dense_images=128, dense_batch=32,
)
SMOKE = Sizes(
    image_model="test_vit", image_shape=(48, 64), text_layers=1, text_hidden=32, text_tokens=16, batch_sizes=(1,),
    timed_batches={"bf16": 1, "fp32": 1}, fungivision_images=1, pipeline_images=8, pipeline_image_shape=(48, 64),
    pipeline_objectives="kl,dino,simclr:num_negatives=2", dense_model="test_vit", dense_size=64, dense_support=32,
    dense_images=2, dense_batch=2,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="every part on the CPU with tiny sizes (under a minute)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="start no part after this many seconds (default: %(default)s)")
    parser.add_argument("--pipeline-batch-size", default="auto", help="--batch-size of the pipeline part (default: auto)")
    parser.add_argument("--pipeline-in-process-rows", type=int, metavar="N",
                        help="--in-process-rows of the pipeline part (default: fungi's; 0 puts --smoke's 8 rows on Ray too)")
    parser.add_argument("--parts", default=",".join(PART_NEEDS),
                        help="comma-separated parts to run, in the check's order (default: %(default)s)")
    parser.add_argument("--output", help="JSON path (default: $OUT/gpu_check.json, else benchmarks/gpu_check.json)")
    args = parser.parse_args(argv)
    args.parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = sorted(set(args.parts) - set(PART_NEEDS))
    if unknown:
        parser.error(f"--parts: unknown part(s) {', '.join(unknown)}; known: {', '.join(PART_NEEDS)}")
    return args


class Report:
    """The rows of every part, written as JSON after each part and printed as one table at the end."""

    def __init__(self, path: Path, device: torch.device, smoke: bool, budget_s: float, parts: list[str]) -> None:
        self.path = path
        self.parts = parts
        self.install_notes = read_notes(os.environ.get("FUNGI_CARRY_SITE"))
        self.started = time.perf_counter()
        self.budget_s = budget_s
        self.smoke = smoke
        self.data: dict[str, Any] = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
            "torch": torch.__version__,
            "smoke": smoke,
            "started": datetime.now().isoformat(timespec="seconds"),
            "parts": {},
            "skipped": [],
            "failed": [],
            "seconds": {},
            "targets": TARGETS,
        }

    def run(self, part: str, label: str, measure: Callable[[], list[dict[str, Any]]]) -> None:
        """Run one measurement of ``part`` unless it was not asked for, its packages are missing
        or the budget is spent; keep its rows."""
        if part not in self.parts:
            return
        missing = missing_modules(part)
        if missing:
            reasons = "; ".join(f"{module} ({requirement}) is not importable: "
                                f"{self.install_notes.get(requirement, 'gpu_carry.py install did not run')}"
                                for module, requirement in missing.items())
            self.data["failed"].append(f"{part}: {label}: missing package: {reasons}")
            print(f"gpu_check: {part}: {label} not run: missing package: {reasons}", file=sys.stderr, flush=True)
            self.write()
            return
        elapsed = time.perf_counter() - self.started
        if elapsed > self.budget_s:
            self.data["skipped"].append(f"{part}: {label} (budget of {self.budget_s:.0f} s spent at {elapsed:.0f} s)")
            return
        began = time.perf_counter()
        try:
            rows = measure()
        except Exception as exc:  # noqa: BLE001 - one failed part (an OOM, a missing package) must not cost the others' figures
            if self.smoke:  # the smoke test is there to catch exactly this
                raise
            self.data["failed"].append(f"{part}: {label}: {type(exc).__name__}: {str(exc)[-1500:]}")
            print(f"gpu_check: {part}: {label} FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            self.write()
            release_memory()
            return
        self.data["parts"].setdefault(part, []).extend(rows)
        self.data["seconds"][f"{part}: {label}"] = round(time.perf_counter() - began, 1)
        print(f"gpu_check: {part}: {label} done in {time.perf_counter() - began:.1f} s", flush=True)
        self.write()
        release_memory()

    def write(self) -> None:
        self.data["total_s"] = round(time.perf_counter() - self.started, 1)
        self.data["verdict"] = verdict(self.data["parts"])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1))


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- data ---------------------------------------------------------------------------
def smooth_images(count: int, shape: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """Blocky random RGB images: content that crops and JPEG-compresses like photos, not noise."""
    rng = np.random.default_rng(seed)
    height, width = shape
    blocks = rng.integers(0, 256, (count, -(-height // 8), -(-width // 8), 3), dtype=np.uint8)
    return [np.kron(block, np.ones((8, 8, 1), np.uint8))[:height, :width] for block in blocks]


def texts(count: int, words: int, seed: int = 0) -> list[str]:
    """Random sentences long enough to fill ``words`` tokens (and be truncated there)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=words + 16)) for _ in range(count)]


BERT_VOCAB = 30522
"""BERT-base's vocabulary size: the embedding keeps its real size though the tokenizer knows fewer words."""


def save_random_bert(directory: Path, sizes: Sizes) -> None:
    """A random-init BERT (BERT-base for the full check) with a WordPiece tokenizer over
    :data:`WORDS`, capped at ``text_tokens`` tokens, as a local Hugging Face directory: no
    hub and no model package needed (the lent machines have neither). Every text of
    :func:`texts` is one token a word, so the timed sequences are ``text_tokens`` long."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS))]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(directory / "vocab.txt"), model_max_length=sizes.text_tokens)
    tokenizer.save_pretrained(str(directory))
    heads = max(1, sizes.text_hidden // 64)
    config = BertConfig(
        vocab_size=BERT_VOCAB, hidden_size=sizes.text_hidden, num_hidden_layers=sizes.text_layers,
        num_attention_heads=heads, intermediate_size=4 * sizes.text_hidden, max_position_embeddings=512,
    )
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(str(directory))


def random_negatives(engine: Featurizer) -> None:
    """SimCLR negatives as the setup stores them (``num_negatives`` rows x views), random: setup is not what is timed."""
    simclr = engine.objectives["simclr"]
    views = next(group.count for group in engine.groups if group.kind == "contrastive")
    gen = torch.Generator().manual_seed(1)
    simclr.set_negatives(torch.randn(simclr.config.num_negatives * views, simclr.config.latent_dim, generator=gen))


# -- 1. engine ----------------------------------------------------------------------
def measure_engine(engine: Featurizer, samples: list, batch: int, timed: int, device: torch.device) -> dict[str, Any]:
    """featurize and its forward-only floor on ``timed`` batches after one warm-up batch."""
    keys = [f"row{i}" for i in range(len(samples))]
    chunks = list(zip(batches(samples[: batch * (timed + 1)], batch), batches(keys[: batch * (timed + 1)], batch)))
    warm, measured = chunks[:1], chunks[1:]

    def floor(clock: Clock, work: list) -> None:
        with torch.no_grad(), engine._autocast():
            for rows, row_keys in work:
                views = engine.adapter.build_views(rows, row_keys, engine.groups, engine.spec.seed, device)
                with clock.measure():  # the forward of every view in one pass, as the engine does on accelerators
                    engine.backbone.embed(views)

    def fungi(clock: Clock, work: list) -> None:
        with clock.measure():
            for rows, row_keys in work:
                engine.featurize(rows, row_keys)

    figures: dict[str, Any] = {}
    memory = PeakMemory(device)
    for name, method in (("floor", floor), ("fungi", fungi)):
        method(Clock(device), warm)
        memory.reset()
        clock = Clock(device)
        method(clock, measured)
        figures[name] = (batch * timed / clock.wall, memory.peak_mib())
    return {
        "batch": batch,
        "rows_per_s": round(figures["fungi"][0], 2),
        "floor_rows_per_s": round(figures["floor"][0], 2),
        "ratio_to_floor": round(figures["floor"][0] / figures["fungi"][0], 3),
        "peak_mib": round(figures["fungi"][1], 1),
        "floor_peak_mib": round(figures["floor"][1], 1),
        "views_per_row": sum(group.count for group in engine.groups),
    }


def engine_rows(kind: str, precision: str, sizes: Sizes, device: torch.device, text_dir: Path,
                reference: dict[str, dict[str, np.ndarray]]) -> list[dict[str, Any]]:
    """Rows of one model at one precision over the batch sizes; bf16 rows carry their cosine to fp32."""
    if kind == "image":
        engine = build_engine(SimpleNamespace(model=sizes.image_model, precision=precision), device)
        raw = smooth_images(max(sizes.batch_sizes) * (sizes.timed_batches[precision] + 1), sizes.image_shape)
        samples = [engine.decode(image) for image in raw]
        model = f"timm:{sizes.image_model}"
    else:
        if not (text_dir / "config.json").exists():
            save_random_bert(text_dir, sizes)
        spec = FeaturizerSpec(model=f"hf:{text_dir}", modality="text", weights=None, objectives=parse_objectives("kl,simclr"),
                              precision=precision, seed=0)
        engine = Featurizer(spec, device=device)
        samples = [engine.decode(text) for text in texts(max(sizes.batch_sizes) * (sizes.timed_batches[precision] + 1), sizes.text_tokens)]
        model = f"bert ({sizes.text_layers} layers, hidden {sizes.text_hidden}, random), {sizes.text_tokens} tokens"
    random_negatives(engine)
    objectives = "+".join(engine.objectives)
    first = samples[: sizes.batch_sizes[0]]
    features = engine.featurize(first, [f"row{i}" for i in range(len(first))]).features
    reference.setdefault(kind, {})[precision] = features
    cosine = None
    if precision == "bf16" and "fp32" in reference[kind]:
        cosine = _min_cosines(reference[kind]["fp32"], features)
    rows = []
    for batch in sizes.batch_sizes:
        row = {"model": model, "modality": kind, "objectives": objectives, "precision": precision}
        row.update(measure_engine(engine, samples, batch, sizes.timed_batches[precision], device))
        if cosine is not None:
            row["min_cosine_to_fp32"] = cosine
        rows.append(row)
    return rows


def _min_cosines(exact: dict[str, np.ndarray], rounded: dict[str, np.ndarray]) -> dict[str, float]:
    return {
        name: round(float(((a * rounded[name]).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(rounded[name], axis=1))).min()), 5)
        for name, a in exact.items()
    }


# -- 2. fungivision -----------------------------------------------------------------
def fungivision_rows(sizes: Sizes, device: torch.device) -> list[dict[str, Any]]:
    """The reference on the engine's images, model, heads and negatives, against the engine at the same batch."""
    from PIL import Image

    warnings.filterwarnings("ignore", category=FutureWarning)  # fungivision's torch.cuda.amp calls
    warnings.filterwarnings("ignore", category=UserWarning)
    engine = build_engine(SimpleNamespace(model=sizes.image_model, precision="bf16"), device)
    random_negatives(engine)
    reference = build_fungivision(engine, device, engine.objectives["simclr"].negatives.cpu())
    count = sizes.fungivision_images
    warm = min(2, count)
    raw = smooth_images(warm + count, sizes.image_shape, seed=3)
    pil = [Image.fromarray(image) for image in raw]
    reference(pil[:warm])
    memory = PeakMemory(device)
    memory.reset()
    clock = Clock(device)
    with clock.measure():
        reference(pil[warm:])
    theirs, their_peak = count / clock.wall, memory.peak_mib()
    ours = measure_engine(engine, [engine.decode(image) for image in raw[warm:]] * 2, count, 1, device)
    return [{
        "model": f"timm:{sizes.image_model}", "objectives": "kl+dino+simclr", "precision": "bf16 (fungivision: its use_fp16)",
        "batch": count, "fungivision_rows_per_s": round(theirs, 3), "fungivision_peak_mib": round(their_peak, 1),
        "fungi_rows_per_s": ours["rows_per_s"], "speedup": round(ours["rows_per_s"] / theirs, 2),
    }]


# -- 3. pipeline --------------------------------------------------------------------
class UtilisationSampler:
    """GPU utilisation (``nvidia-smi -lms``) with the time each sample arrived; on a machine
    without a GPU (``--smoke``), the CPU's (psutil), so that the windowing is exercised too."""

    def __init__(self, gpu: bool, period_ms: int = 200) -> None:
        self.source = "nvidia-smi utilization.gpu" if gpu else "psutil cpu_percent (no GPU)"
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._process = None
        if gpu:
            self._process = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", f"-lms={period_ms}"],
                stdout=subprocess.PIPE, text=True,
            )
            self._thread = threading.Thread(target=self._read_smi, daemon=True)
        else:
            self._thread = threading.Thread(target=self._read_cpu, args=(period_ms / 1000,), daemon=True)
        self._thread.start()

    def _read_smi(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            value = line.strip().split(",")[0]
            if value.replace(".", "").isdigit():
                self.samples.append((time.time(), float(value)))

    def _read_cpu(self, period: float) -> None:
        import psutil

        psutil.cpu_percent()
        while not self._stop.wait(period):
            self.samples.append((time.time(), psutil.cpu_percent()))

    def stop(self) -> None:
        self._stop.set()
        if self._process is not None:
            self._process.terminate()
            self._process.wait()
        self._thread.join(timeout=5)

    def mean_between(self, start: float, end: float) -> tuple[float | None, int]:
        """(mean utilisation %, samples) of the samples taken in [start, end]; None when no
        sample fell inside (a steady part shorter than the sampling period, as in --smoke)."""
        inside = [value for stamp, value in self.samples if start <= stamp <= end]
        return (round(statistics.fmean(inside), 1) if inside else None), len(inside)


def write_jpeg_parquet(directory: Path, sizes: Sizes, files: int = 4) -> None:
    from PIL import Image

    directory.mkdir(parents=True)
    images = smooth_images(sizes.pipeline_images, sizes.pipeline_image_shape, seed=7)
    payloads = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=90)
        payloads.append(buffer.getvalue())
    per_file = -(-len(payloads) // files)
    for index in range(files):
        part = slice(index * per_file, (index + 1) * per_file)
        ids = [f"img{i:05d}" for i in range(len(payloads))][part]
        pq.write_table(pa.table({"id": ids, "image": pa.array(payloads[part], pa.binary())}), directory / f"part-{index}.parquet")


def pipeline_rows(sizes: Sizes, device: torch.device, scratch: Path, batch_size: str, smoke: bool,
                  in_process_rows: int | None) -> list[dict[str, Any]]:
    """``fungi featurize`` as a user runs it (a fresh process, a local Ray), GPU utilisation sampled meanwhile."""
    data, output = scratch / "pipeline_in", scratch / "pipeline_out"
    write_jpeg_parquet(data, sizes)
    command = [
        sys.executable, "-m", "pipelines.cli", "featurize", "--input", str(data), "--output", str(output),
        "--modality", "image", "--model", f"timm:{sizes.image_model}", "--weights", "random",
        "--objectives", sizes.pipeline_objectives, "--precision", "bf16", "--batch-size", batch_size,
    ]
    if in_process_rows is not None:
        command += ["--in-process-rows", str(in_process_rows)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "RAY_USAGE_STATS_ENABLED": "0"}
    sampler = UtilisationSampler(device.type == "cuda")
    launched = time.time()
    try:
        # on a GPU within the device call's 240 s; a CPU smoke run on a loaded CI machine needs longer (Ray's start)
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=420 if smoke else 180)
    finally:
        sampler.stop()
    finished = time.time()
    if done.returncode != 0:
        raise RuntimeError(f"fungi featurize failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    record = json.loads((output / "_fungi_manifest.json").read_text())["runs"][-1]
    # the run's clock: its start is recorded to the second, and lies after the launch
    started = max(launched, datetime.fromisoformat(record["started"]).timestamp())
    steady_from = started + (record["first_write_s"] or 0.0)
    steady_to = min(finished, started + record["wall_s"])
    utilisation, samples = sampler.mean_between(steady_from, steady_to)
    return [{
        "model": f"timm:{sizes.image_model}", "objectives": sizes.pipeline_objectives.replace(",", "+"), "precision": "bf16",
        "batch": batch_size, "rows": record["rows_written"], "wall_s": record["wall_s"],
        "end_to_end_rows_per_s": round(record["rows_written"] / record["wall_s"], 2),
        "first_write_s": record["first_write_s"], "steady_rows_per_s": record["steady_rows_per_s"],
        "utilisation_pct": utilisation, "utilisation_samples": samples, "utilisation_source": sampler.source,
        "process_wall_s": round(finished - launched, 1), "summary": done.stdout.strip().splitlines()[-1],
    }]


# -- 4. dense -----------------------------------------------------------------------
def dense_rows(sizes: Sizes, device: torch.device) -> list[dict[str, Any]]:
    patches = (sizes.dense_size // 16) ** 2
    args = SimpleNamespace(model=sizes.dense_model, support_size=sizes.dense_support, precision="bf16" if device.type == "cuda" else "fp32",
                           projection_dim=None)
    featurizer, setup_s = build_dense(args, sizes.dense_size, device)
    samples = [make_scene(i, size=sizes.dense_size)[0] for i in range(sizes.dense_images + sizes.dense_batch)]
    keys = [f"scene{i}" for i in range(len(samples))]
    chunks = list(zip(batches(samples, sizes.dense_batch), batches(keys, sizes.dense_batch)))
    featurizer.featurize(*chunks[0])  # warm-up
    memory = PeakMemory(device)
    memory.reset()
    clock = Clock(device)
    with clock.measure():
        for rows, row_keys in chunks[1:]:
            featurizer.featurize(rows, row_keys)
    return [{
        "model": f"timm:{sizes.dense_model}", "image_size": sizes.dense_size, "patches": patches, "precision": args.precision,
        "support_patches": featurizer.support.size, "batch": sizes.dense_batch,
        "rows_per_s": round(sizes.dense_images / clock.wall, 2), "peak_mib": round(memory.peak_mib(), 1),
        "setup_s": round(setup_s, 1),
    }]


# -- verdict and table --------------------------------------------------------------
def verdict(parts: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The issue's targets against the figures of this run (None where a part is missing)."""
    image_bf16 = [r for r in parts.get("engine", []) if r["modality"] == "image" and r["precision"] == "bf16"]
    best = max((r["rows_per_s"] for r in image_bf16), default=None)
    pipeline = (parts.get("pipeline") or [None])[0]
    reference = (parts.get("fungivision") or [None])[0]
    pipe_rate = pipeline and pipeline["end_to_end_rows_per_s"]
    return {
        "engine_images_per_s": best,
        "pipeline_vs_engine": round(pipe_rate / best, 3) if pipe_rate and best else None,
        "gpu_utilisation_pct": pipeline and pipeline["utilisation_pct"],
        "vs_fungivision": reference and reference["speedup"],
    }


def table(data: dict[str, Any]) -> str:
    lines = [f"# fungi GPU check: {data['device']}, torch {data['torch']}{' (SMOKE: tiny sizes on the CPU)' if data['smoke'] else ''}", ""]
    lines += ["| part | model | objectives | precision | batch | rows/s | floor rows/s | floor / fungi | peak MiB | notes |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for row in data["parts"].get("engine", []):
        note = ", ".join(f"{k} {v}" for k, v in row.get("min_cosine_to_fp32", {}).items())
        lines.append(f"| engine | {row['model']} | {row['objectives']} | {row['precision']} | {row['batch']} | {row['rows_per_s']} | "
                     f"{row['floor_rows_per_s']} | {row['ratio_to_floor']} | {row['peak_mib']} | "
                     f"{row['views_per_row']} views/row{'; min cosine to fp32: ' + note if note else ''} |")
    for row in data["parts"].get("fungivision", []):
        lines.append(f"| fungivision | {row['model']} | {row['objectives']} | {row['precision']} | {row['batch']} | "
                     f"{row['fungivision_rows_per_s']} | | | {row['fungivision_peak_mib']} | fungi {row['fungi_rows_per_s']} rows/s: "
                     f"{row['speedup']}x |")
    for row in data["parts"].get("pipeline", []):
        lines.append(f"| pipeline | {row['model']} | {row['objectives']} | {row['precision']} | {row['batch']} | "
                     f"{row['end_to_end_rows_per_s']} | | | | {row['rows']} rows, steady {row['steady_rows_per_s']} rows/s after "
                     f"{row['first_write_s']} s; utilisation {row['utilisation_pct']} % ({row['utilisation_samples']} samples, "
                     f"{row['utilisation_source']}) |")
    for row in data["parts"].get("dense", []):
        lines.append(f"| dense | {row['model']} | dense ({row['image_size']} px, {row['patches']} patches) | {row['precision']} | "
                     f"{row['batch']} | {row['rows_per_s']} | | | {row['peak_mib']} | support {row['support_patches']} patches |")
    lines += ["", "targets (one H200, ViT-B/16, three objectives, bf16): " + "; ".join(
        f"{name} {value} (target {'>=' if name else ''} {TARGETS[name]})" for name, value in data["verdict"].items())]
    if data["skipped"]:
        lines.append("skipped (budget): " + "; ".join(data["skipped"]))
    if data["failed"]:
        lines.append("failed: " + "; ".join(data["failed"]))
    lines.append(f"total {data['total_s']} s; JSON: see the path below")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --smoke on a machine without a GPU", file=sys.stderr)
        return 2
    sizes = SMOKE if args.smoke else FULL
    out = os.environ.get("OUT")
    path = Path(args.output) if args.output else (Path(out) / "gpu_check.json" if out else ROOT / "benchmarks" / "gpu_check.json")
    report = Report(path, device, args.smoke, args.budget_s, args.parts)
    reference: dict[str, dict[str, np.ndarray]] = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        text_dir = Path(scratch) / "bert"
        report.run("engine", "image fp32", lambda: engine_rows("image", "fp32", sizes, device, text_dir, reference))
        report.run("engine", "image bf16", lambda: engine_rows("image", "bf16", sizes, device, text_dir, reference))
        report.run("pipeline", "fungi featurize", lambda: pipeline_rows(sizes, device, Path(scratch), args.pipeline_batch_size, args.smoke,
                                                                                   args.pipeline_in_process_rows))
        report.run("fungivision", "image bf16", lambda: fungivision_rows(sizes, device))
        report.run("dense", f"{sizes.dense_size} px", lambda: dense_rows(sizes, device))
        report.run("engine", "text fp32", lambda: engine_rows("text", "fp32", sizes, device, text_dir, reference))
        report.run("engine", "text bf16", lambda: engine_rows("text", "bf16", sizes, device, text_dir, reference))
    report.write()
    print(table(report.data))
    print(f"gpu_check: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
