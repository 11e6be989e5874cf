"""The CPU side of a GPU node: can its cores feed a GPU, and how many does it take? (issue 36)

Whether a GPU stays busy depends on the work around it, which runs on the node's CPUs:
read (Parquet), hash (row keys), decode (JPEG -> RGB at the eval resize), pack, stage
(Parquet in the staging area), finalize and commit. This runs ``fungi featurize``'s real
stream on 2,000 photo-like 375x500 JPEGs in Parquet, ViT-B/16 with KL + DINO + SimCLR at
batch 64, with the featurizer replaced by a stand-in GPU (:class:`StandInFeaturizer`: the
real model's spec, feature widths and setup state, but ``featurize`` holds for
``batch / rate`` seconds and returns random features of the right shapes), and reports:

1. in one process (``--in-process-rows`` above the rows: the same stage functions one block
   after another), the CPU-ms per image of each stage and of all of them outside the
   featurizer (``time.process_time`` around each stage);
2. on a local Ray (2 CPUs and one declared GPU: one GPU actor, as on a GPU node), the
   rate the stand-in is fed (its images over the span from its first batch to the end of its
   last) and the share of that span it is busy, with no delay in it, then with the stand-in
   at fractions of the rate these cores can feed (their CPU over the per-image work) (target: >= 0.9x the stand-in's rate), and the CPU seconds (user + sys)
   of every process of the Ray session (driver, Ray's daemons, workers; psutil, by role:
   :class:`SessionCPU`), split into the work that grows with the images (stage tasks, the
   actor), a run's fixed part (worker starts, setup) and Ray's work per second (daemons,
   driver, Ray Data's actors);
3. from (2), the cores it takes to feed 250 and 1,000 images/s (target: <= 8 of a 16-core
   node's for 250): the per-image work times the rate, plus Ray's per-second cores.

The images are crops of scikit-learn's two sample photographs (``load_sample_images``),
zoomed, flipped and tinted at random, so each JPEG is a distinct photo-like image (about
the size and entropy of a camera JPEG at this resolution), not noise. CPU times count only
this run's processes, so they hold on a shared machine; rates do not: other work on the
same cores slows them (the load average is printed beside them).

    python benchmarks/bench_gpu_feed.py [--images 2000] [--fractions 0.5,0.8]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

MODEL, OBJECTIVES, BATCH = "timm:vit_base_patch16_224", "kl,dino,simclr", 64
RATE_FILE = "FUNGI_BENCH_STAND_IN_RATE_FILE"
"""Env var naming the file that holds the stand-in's rate (images/s; 0: no delay), read when a featurizer is made."""


# -- the stand-in GPU ------------------------------------------------------------------
def stand_in_class() -> type:
    """:class:`StandInFeaturizer` (made on first use: fungi_ops imports torch)."""
    from fungi_ops import Featurizer
    from fungi_ops.featurizer import FeatureBatch

    class StandInFeaturizer(Featurizer):
        """The real featurizer's model, spec, feature widths and setup state; ``featurize`` is a
        GPU at ``rate`` images/s: it holds for ``len(samples) / rate`` seconds (a sleep: the
        node's CPUs stay free, as while a GPU computes) and returns random unit features."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.rate = float(Path(os.environ[RATE_FILE]).read_text())
            self.rng = np.random.default_rng(0)

        def setup(self, samples: Any, keys: Any, batch_size: int = 8) -> None:
            """Random SimCLR negatives of the real shape: setup is not what is measured."""
            import torch

            for objective in self.objectives.values():
                if objective.needs_setup:
                    views = next(group.count for group in self.groups if group.kind == objective.config.view_kind)
                    generator = torch.Generator().manual_seed(1)
                    objective.set_negatives(torch.randn(len(samples) * views, objective.config.latent_dim, generator=generator))

        def featurize(self, samples: Any, keys: Any) -> Any:
            began = time.time()
            if self.rate > 0:
                time.sleep(len(samples) / self.rate)
            with open(os.environ[RATE_FILE] + ".calls", "a") as calls:  # when the "GPU" was busy: start, end, images
                calls.write(f"{began} {time.time()} {len(samples)}\n")
            features = {}
            for name, dim in self.feature_dims.items():
                values = self.rng.standard_normal((len(samples), dim), dtype=np.float32)
                features[name] = values / np.linalg.norm(values, axis=1, keepdims=True)
            return FeatureBatch([str(k) for k in keys], features)

    return StandInFeaturizer


def install_stand_in() -> None:
    """Make ``fungi_ops.make_featurizer`` (what the actors and the setup task call) build the stand-in.

    Runs in this process and, as Ray's ``worker_process_setup_hook``, in every Ray worker. It
    imports no torch (3.2 CPU-s): only the workers that build a featurizer do, as in a real run,
    where a read or write worker never imports it."""
    import fungi_ops

    def make_stand_in(spec: Any, **options: Any) -> Any:
        import torch

        from fungi_ops.projection import RandomProjection

        # the projection is never used by the stand-in, and ViT-B's is 768 x 590,592 (1.7 GiB, seconds
        # of CPU to draw in every actor): an uninitialised matrix of its shape (its pages never touched)
        RandomProjection.for_featurizer = classmethod(
            lambda cls, out_dim, in_dim, seed, *, dtype, device, explicit=None: cls(torch.empty((out_dim, in_dim), dtype=dtype)))
        return stand_in_class()(spec, **options)

    fungi_ops.make_featurizer = make_stand_in


# -- data ------------------------------------------------------------------------------
def photo_jpegs(count: int, seed: int = 0, shape: tuple[int, int] = (375, 500)) -> list[bytes]:
    """``count`` distinct photo-like JPEGs (quality 90): random zoomed, flipped, tinted crops of
    scikit-learn's sample photographs, resized to ``shape`` (height, width)."""
    from PIL import Image, ImageEnhance
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(image) for image in load_sample_images().images]
    rng = np.random.default_rng(seed)
    height, width = shape
    payloads = []
    for index in range(count):
        photo = photos[index % len(photos)]
        zoom = rng.uniform(1.0, 1.7)
        crop_w = min(photo.width, int(photo.width / zoom))
        crop_h = min(photo.height, int(crop_w * height / width))
        left, top = int(rng.integers(0, photo.width - crop_w + 1)), int(rng.integers(0, photo.height - crop_h + 1))
        image = photo.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image = ImageEnhance.Color(ImageEnhance.Brightness(image).enhance(rng.uniform(0.7, 1.3))).enhance(rng.uniform(0.6, 1.4))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        payloads.append(buffer.getvalue())
    return payloads


def write_input(directory: Path, count: int, files: int = 4) -> int:
    """``count`` JPEGs in ``files`` Parquet files (id, image); returns the JPEG bytes."""
    payloads = photo_jpegs(count)
    directory.mkdir(parents=True)
    per_file = -(-count // files)
    for index in range(files):
        part = slice(index * per_file, (index + 1) * per_file)
        ids = [f"img{i:05d}" for i in range(count)][part]
        pq.write_table(pa.table({"id": ids, "image": pa.array(payloads[part], pa.binary())}), directory / f"part-{index}.parquet")
    return sum(map(len, payloads))


def featurize(data: Path, output: Path, *extra: str) -> dict[str, Any]:
    """``fungi featurize`` in this process; its run record."""
    from pipelines.cli import main

    code = main(["featurize", "--input", str(data), "--output", str(output), "--modality", "image", "--model", MODEL,
                 "--weights", "random", "--objectives", OBJECTIVES, "--batch-size", str(BATCH), *extra])
    if code:
        raise SystemExit(f"fungi featurize exited {code}")
    return json.loads((output / "_fungi_manifest.json").read_text())["runs"][-1]


# -- 1. per stage, in one process --------------------------------------------------------
class StageClock:
    """CPU seconds (``time.process_time``) spent in each of the stream's stage functions (patched where
    :mod:`pipelines.job.stream` calls them)."""

    STAGES = ("read_sources", "decode_batch", "write_batch", "finalize_source")

    def __init__(self) -> None:
        self.seconds = dict.fromkeys((*self.STAGES, "featurize (stand-in)"), 0.0)
        self.originals: dict[str, Any] = {}

    def __enter__(self) -> "StageClock":
        from pipelines.job import stream

        self.originals = {name: getattr(stream, name) for name in (*self.STAGES, "FeaturizeActor")}
        for name in self.STAGES:
            original = getattr(stream, name)
            setattr(stream, name, self._generator(name, original) if name == "read_sources" else self._call(name, original))
        actor = stream.FeaturizeActor
        clock = self

        class TimedActor(actor):
            def __call__(self, table: pa.Table) -> pa.Table:
                began = time.process_time()
                try:
                    return super().__call__(table)
                finally:
                    clock.seconds["featurize (stand-in)"] += time.process_time() - began

        stream.FeaturizeActor = TimedActor
        return self

    def __exit__(self, *exc: Any) -> None:
        from pipelines.job import stream

        for name, original in self.originals.items():
            setattr(stream, name, original)

    def _call(self, name: str, function: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[name] += time.process_time() - began
        return timed

    def _generator(self, name: str, function: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            iterator = function(*args, **kwargs)
            while True:
                began = time.process_time()
                try:
                    item = next(iterator)
                except StopIteration:
                    return
                finally:
                    self.seconds[name] += time.process_time() - began
                yield item
        return timed


def decode_profile(payloads: list[bytes]) -> dict[str, float]:
    """CPU-ms per image of the decode stage's parts: JPEG decode, resize to the eval size, pack."""
    from PIL import Image

    import fungi_ops
    from pipelines.job.decode import pack

    decoder = fungi_ops.make_featurizer(fungi_ops.FeaturizerSpec(model=MODEL, modality="image", weights="random")).adapter
    import torch
    from torchvision.io import decode_jpeg

    timings = {"open+decode JPEG": 0.0, "resize": 0.0, "pack": 0.0, "torchvision decode_jpeg (alternative)": 0.0}
    same = 0
    for payload in payloads:
        began = time.process_time()
        pixels = decode_jpeg(torch.frombuffer(bytearray(payload), dtype=torch.uint8)).permute(1, 2, 0).numpy()
        timings["torchvision decode_jpeg (alternative)"] += time.process_time() - began
        same += np.array_equal(pixels, np.asarray(decoder.open_rgb(payload)))
        began = time.process_time()
        image = decoder.open_rgb(payload)
        decoded = time.process_time()
        width, height = image.size
        short = decoder.settings.resize_size
        scale = short / min(width, height)
        image = image.resize((max(short, round(width * scale)), max(short, round(height * scale))), Image.BICUBIC, reducing_gap=None)
        array = np.asarray(image, dtype=np.uint8)
        resized = time.process_time()
        pack("image", array)
        timings["open+decode JPEG"] += decoded - began
        timings["resize"] += resized - decoded
        timings["pack"] += time.process_time() - resized
    profile = {name: 1000 * seconds / len(payloads) for name, seconds in timings.items()}
    profile["torchvision pixels identical (fraction)"] = same / len(payloads)
    return profile


# -- 2. on Ray ------------------------------------------------------------------------
ROLES = (
    # (role, what a process's title or command line contains), first match wins
    ("stage tasks", ("read_sources", "decode_batch", "write_batch", "finalize_source", "StreamingRepartition")),
    ("featurize actor (stand-in)", ("MapBatches(FeaturizeActor))", "MapBatches(FeaturizeActor)).submit")),
    ("setup (spec, setup rows, actor load)", ("setup_rows", "FeaturizeActor)).__init__", "_scan_new", "spec_resolution")),
    ("worker start (Python, Ray, imports)", ("ray::IDLE", "default_worker.py")),
    ("Ray Data's actors", ("_StatsActor", "AutoscalingCoordinator", "ActorLocationTracker")),
    ("Ray daemons", ("raylet", "gcs_server", "log_monitor", "DashboardAgent", "RuntimeEnvAgent", "dashboard", "monitor.py")),
)
PER_IMAGE_ROLES = ("stage tasks", "featurize actor (stand-in)")
"""The roles whose CPU grows with the images; the rest is a run's fixed part or Ray's per-second work."""
FIXED_ROLES = ("setup (spec, setup rows, actor load)", "worker start (Python, Ray, imports)")
WORKER_ROLES = (*PER_IMAGE_ROLES, *FIXED_ROLES, "Ray Data's actors")


def process_role(process: Any, driver: int) -> str:
    """What a process of the Ray session is (:data:`ROLES`), from its title (Ray names a worker after its task)."""
    if process.pid == driver:
        return "driver (plan, Ray Data's executor, commit)"
    command = " ".join(process.cmdline())
    for role, marks in ROLES:
        if any(mark in command for mark in marks):
            return role
    return "other: " + command[:40]


class SessionCPU:
    """CPU seconds (user + sys) of this process and its descendants (the Ray session: daemons and
    workers), by role (:func:`process_role`), sampled every ``interval`` seconds.

    A sample's CPU since the last one is credited to the role the process had at that sample (a
    worker takes its task's title); a process first seen counts all its CPU, one that ends keeps
    its last sample (at most ``interval`` of it is lost). The sampler's own CPU (a walk of
    ``/proc``: tens of ms on a machine with many processes) is taken off the driver's."""

    def __init__(self, interval: float = 1.0) -> None:
        import psutil

        self.me = psutil.Process()
        self.interval = interval
        self.last: dict[int, float] = {}
        self.roles: dict[str, float] = {}
        self.started: set[int] = set()  # Ray worker processes started during the run
        self.sampler_seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self, *, baseline: bool = False) -> None:
        import psutil

        began = time.thread_time()
        for process in [self.me, *self.me.children(recursive=True)]:
            try:
                times = process.cpu_times()
                role = process_role(process, self.me.pid)
            except psutil.Error:
                continue
            seconds = times.user + times.system
            if not baseline:
                self.roles[role] = self.roles.get(role, 0.0) + seconds - self.last.get(process.pid, 0.0)
                if process.pid not in self.last and role in WORKER_ROLES:
                    self.started.add(process.pid)
            self.last[process.pid] = seconds
        self.sampler_seconds += time.thread_time() - began

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "SessionCPU":
        self.sample(baseline=True)
        self.sampler_seconds = 0.0
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        driver = next(role for role in self.roles if role.startswith("driver"))
        self.roles[driver] -= self.sampler_seconds
        self.total = sum(self.roles.values())


def ray_run(data: Path, output: Path, rate: float, rate_file: Path, images: int) -> dict[str, Any]:
    """One ``fungi featurize`` on the local Ray with the stand-in at ``rate`` (0: no delay); its figures."""
    rate_file.write_text(str(rate))
    Path(f"{rate_file}.calls").unlink(missing_ok=True)  # the in-process run's
    load = os.getloadavg()[0]
    with SessionCPU() as cpu:
        # a GPU actor holds one CPU by default: a quarter here, or on 2 CPUs it waits behind the read tasks
        record = featurize(data, output, "--in-process-rows", "0", "--cpus-per-actor", "0.25")
    assert record["rows_written"] == images, record
    steady, wall = record["steady_rows_per_s"], record["wall_s"]
    calls = np.loadtxt(f"{rate_file}.calls", ndmin=2)
    Path(f"{rate_file}.calls").unlink()
    span = calls[:, 1].max() - calls[:, 0].min()  # from the stand-in's first batch to the end of its last
    fed = calls[:, 2].sum() / span
    roles = {role: round(1000 * seconds / images, 2) for role, seconds in sorted(cpu.roles.items(), key=lambda kv: -kv[1])}
    per_image = sum(roles.get(role, 0.0) for role in PER_IMAGE_ROLES)
    fixed_s = sum(cpu.roles.get(role, 0.0) for role in FIXED_ROLES)
    return {"stand_in_rate": rate or None, "rows": record["rows_written"], "wall_s": wall,
            "first_write_s": record["first_write_s"], "steady_rows_per_s": steady,
            # the rate the stand-in was fed over its busy span, and the share of it the stand-in ("GPU") was busy
            "fed_rows_per_s": round(fed, 1), "vs_stand_in": round(fed / rate, 3) if rate else None,
            "stand_in_busy": round((calls[:, 1] - calls[:, 0]).sum() / span, 3),
            "cpu_ms_per_image": round(1000 * cpu.total / images, 2), "cpu_ms_per_image_by_role": roles,
            "per_image_cpu_ms": round(per_image, 2), "fixed_cpu_s": round(fixed_s, 1),
            # the driver's executor, Ray's daemons and Ray Data's actors: work per second of the run, not per image
            "per_second_cores": round((cpu.total - fixed_s - per_image * images / 1000) / wall, 3),
            "workers_started": len(cpu.started), "sampler_cpu_s": round(cpu.sampler_seconds, 1),
            "load_average": round(load, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--fractions", default="0.5,0.8", help="stand-in rates to run, as fractions of the no-delay rate")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (default: %(default)s, this machine's)")
    parser.add_argument("--output", help="JSON path for the figures")
    args = parser.parse_args(argv)
    import ray

    scratch = Path(tempfile.mkdtemp(prefix="bench_gpu_feed_"))
    rate_file = scratch / "rate"
    os.environ[RATE_FILE] = str(rate_file)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "benchmarks"), str(ROOT), os.environ.get("PYTHONPATH")]))
    began = time.perf_counter()
    data = scratch / "input"
    jpeg_bytes = write_input(data, args.images)
    print(f"{args.images} JPEGs 375x500, {jpeg_bytes / args.images / 1024:.0f} KiB each on average, "
          f"written in {time.perf_counter() - began:.0f} s", flush=True)
    install_stand_in()
    rate_file.write_text("0")
    figures: dict[str, Any] = {"images": args.images, "jpeg_kib": round(jpeg_bytes / args.images / 1024, 1),
                               "model": MODEL, "objectives": OBJECTIVES, "batch": BATCH}

    # 1. per stage, in this process
    payloads = pq.read_table(data / "part-0.parquet").column("image").to_pylist()[:200]
    figures["decode_ms"] = {k: round(v, 2) for k, v in decode_profile(payloads).items()}
    with StageClock() as clock:
        cpu_began = time.process_time()
        record = featurize(data, scratch / "in_process", "--in-process-rows", str(args.images + 1))
        total = time.process_time() - cpu_began
    per_image = {name: 1000 * seconds / args.images for name, seconds in clock.seconds.items()}
    figures["in_process"] = {"stage_cpu_ms_per_image": {k: round(v, 2) for k, v in per_image.items()},
                             "stages_outside_featurizer_cpu_ms_per_image": round(
                                 sum(per_image.values()) - per_image["featurize (stand-in)"], 2),
                             # once a run: model loads (spec, setup, actor), plan, setup rows, commit
                             "rest_cpu_s": round(total - sum(clock.seconds.values()), 1), "wall_s": record["wall_s"]}
    print(json.dumps(figures["in_process"], indent=1), flush=True)

    # 2. on Ray: one declared GPU, so that the pool is one GPU actor with Ray Data's prefetching, as on a GPU node
    ray.init(num_cpus=args.cpus, num_gpus=1, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"},
                          "worker_process_setup_hook": "bench_gpu_feed.install_stand_in"})
    runs = [ray_run(data, scratch / "ray_max", 0.0, rate_file, args.images)]
    print(json.dumps(runs[-1]), flush=True)
    # what the cores can feed: their CPU over the per-image work (a no-delay run cannot show it, as the
    # stream decodes the whole input into the object store while the actor loads its model)
    feedable = round(args.cpus * 1000 / runs[0]["per_image_cpu_ms"], 1)
    for fraction in (float(f) for f in args.fractions.split(",") if f):
        runs.append(ray_run(data, scratch / f"ray_{fraction}", round(fraction * feedable, 1), rate_file, args.images))
        print(json.dumps(runs[-1]), flush=True)
    ray.shutdown()
    figures["ray"] = runs
    # when the cores are the limit (no delay): the stage work per image, plus Ray's per-second work at that rate
    no_delay = runs[0]
    per_image, per_second = no_delay["per_image_cpu_ms"], no_delay["per_second_cores"]
    figures["cores_for"] = {str(rate): {"stage_work": round(rate * per_image / 1000, 1), "ray_per_second": per_second,
                                        "total": round(rate * per_image / 1000 + per_second, 1)} for rate in (250, 1000)}
    figures["feedable_rate"] = feedable
    figures["total_s"] = round(time.perf_counter() - began, 1)
    print(json.dumps({k: figures[k] for k in ("decode_ms", "cores_for", "feedable_rate", "total_s")}, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
