"""The GPU paths, checked on the CPU: bf16 autocast against fp32, ``--batch-size auto``, the
out-of-memory retry in halves, and fractional ``--gpus-per-actor`` on a Ray with a logical GPU.

bf16 tolerance: every row of every feature block (embedding and each projected gradient)
must have cosine similarity >= 0.99 with its fp32 counterpart. bf16 keeps 8 bits of
mantissa (a relative rounding of 2**-9 per operation); autocast leaves the heads and losses
in float64 and accumulates the matmuls in float32, so the error grows with depth but stays
far inside 1 % of the direction (measured here: >= 0.9999 on the tiny ViT and on the
6-layer MiniLM; ``benchmarks/gpu_check.sh`` reports it for ViT-B/16 on a GPU). Features are
compared by cosine (kNN, linear probes), and 0.99 keeps a row's neighbours apart from
features whose cosine differs by more than that.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_engine import ATOL, NEGATIVE_TEXTS, TEXTS, image_negatives, image_spec, with_negatives
from test_engine import image_engine, images  # noqa: F401 - fixtures

from fungi_ops import ConfigError, Featurizer, FeaturizerSpec, parse_objectives
from fungi_ops.batch_size import AUTO_CPU_BATCH, parse_batch_size, stream_batch_size
from fungi_ops.featurizer import BatchRunner, merge_feature_batches

ROOT = Path(__file__).resolve().parents[1]
BF16_MIN_COSINE = 0.99


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def engine(image_engine: Featurizer) -> Featurizer:
    """tests/test_engine.py's tiny image featurizer (fp32, KL + DINO + SimCLR)."""
    return image_engine


def keys_for(samples: list) -> list[str]:
    return [f"row{i}" for i in range(len(samples))]


# -- bf16 autocast ------------------------------------------------------------------
def test_bf16_image_features_are_within_tolerance_of_fp32(engine: Featurizer, images: list[np.ndarray]) -> None:
    bf16 = with_negatives(Featurizer(image_spec(precision="bf16"), device="cpu"), image_negatives())
    assert bf16.compute_dtype == torch.bfloat16 and engine.compute_dtype == torch.float32
    exact = engine.featurize(images, keys_for(images)).features
    rounded = bf16.featurize(images, keys_for(images)).features
    for name in engine.feature_names:
        assert not np.array_equal(exact[name], rounded[name]), f"{name}: bf16 did not run"
        assert row_cosines(exact[name], rounded[name]).min() >= BF16_MIN_COSINE, name


def test_bf16_text_features_are_within_tolerance_of_fp32(minilm_dir: str) -> None:
    def text_engine(precision: str) -> Featurizer:
        spec = FeaturizerSpec(model=f"hf:{minilm_dir}", modality="text", objectives=parse_objectives("kl,simclr"), precision=precision)
        return with_negatives(Featurizer(spec, device="cpu"), NEGATIVE_TEXTS)

    exact = text_engine("fp32").featurize(TEXTS, keys_for(TEXTS)).features
    rounded = text_engine("bf16").featurize(TEXTS, keys_for(TEXTS)).features
    for name in exact:
        assert row_cosines(exact[name], rounded[name]).min() >= BF16_MIN_COSINE, name


# -- batch size auto and the out-of-memory retry ------------------------------------
def out_of_memory_above(featurizer: Featurizer, rows: int, calls: list[int]):
    """featurize, but raising torch.OutOfMemoryError for batches of more than ``rows``, as a full GPU would."""

    def featurize(samples, keys):
        calls.append(len(samples))
        if len(samples) > rows:
            raise torch.OutOfMemoryError(f"injected: {len(samples)} rows > {rows}")
        return featurizer.featurize(samples, keys)

    return featurize


def test_out_of_memory_batch_is_redone_in_halves(engine: Featurizer, images: list[np.ndarray]) -> None:
    keys = keys_for(images)
    whole = engine.featurize(images, keys)
    calls: list[int] = []
    runner = BatchRunner(engine, len(images), featurize=out_of_memory_above(engine, 2, calls))
    split = runner(images, keys)
    assert calls == [8, 4, 2, 2, 2, 2] and runner.batch_size == 2 and runner.splits == 2
    halves = merge_feature_batches([engine.featurize(images[i : i + 2], keys[i : i + 2]) for i in range(0, 8, 2)])
    assert split.keys == keys and not split.errors
    for name in engine.feature_names:
        np.testing.assert_array_equal(split.features[name], halves.features[name], err_msg=name)  # bit for bit
        # and the features of the unsplit batch: batch-independent, to the tolerance tests/test_engine.py allows
        np.testing.assert_allclose(split.features[name], whole.features[name], atol=ATOL, rtol=0, err_msg=name)
    calls.clear()
    runner(images[:4], keys[:4])  # the next batch starts at the size that fitted
    assert calls == [2, 2]


def test_out_of_memory_of_one_row_is_raised(engine: Featurizer, images: list[np.ndarray]) -> None:
    runner = BatchRunner(engine, 4, featurize=out_of_memory_above(engine, 0, []))
    with pytest.raises(torch.OutOfMemoryError):
        runner(images[:4], keys_for(images[:4]))


def test_error_rows_keep_their_positions_across_halves(engine: Featurizer, images: list[np.ndarray]) -> None:
    samples = list(images[:4])
    samples[3] = np.full_like(samples[3], 0)
    bad = samples[3]

    def featurize(chunk, keys):
        result = engine.featurize(chunk, keys)
        for index, sample in enumerate(chunk):
            if sample is bad:  # as a row with non-finite features would be reported
                result.errors[index] = ConfigError("bad row")
        if len(chunk) > 2:
            raise torch.OutOfMemoryError("injected")
        return result

    merged = BatchRunner(engine, 4, featurize=featurize)(samples, keys_for(samples))
    assert list(merged.errors) == [3]


def test_batch_size_auto_on_the_cpu_is_the_documented_default(engine: Featurizer, images: list[np.ndarray]) -> None:
    runner = BatchRunner(engine, "auto")
    runner(images[:2], keys_for(images[:2]))
    assert runner.batch_size == AUTO_CPU_BATCH == 16
    assert stream_batch_size("auto", accelerated=False) == 16 and stream_batch_size(5, accelerated=True) == 5


@pytest.mark.parametrize("value", ["0", "-3", "big", "2.5", 0])
def test_bad_batch_size_is_refused(value) -> None:
    with pytest.raises(ConfigError, match="--batch-size"):
        parse_batch_size(value)
    assert parse_batch_size("AUTO") == "auto" and parse_batch_size("32") == 32


def test_cli_takes_batch_size_auto_by_default_and_refuses_zero(capsys) -> None:
    from pipelines.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["featurize", "--input", "i", "--output", "o", "--modality", "text", "--model", "hf:x"])
    assert args.batch_size == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["featurize", "--input", "i", "--output", "o", "--modality", "text", "--model", "hf:x", "--batch-size", "0"])
    assert "--batch-size must be a positive integer or 'auto'" in capsys.readouterr().err


# -- fractional GPUs per actor ------------------------------------------------------
SCHEDULING_CHILD = textwrap.dedent(
    """
    import json, sys, threading
    import ray
    from pipelines.config import FeaturizeConfig
    from pipelines.job import FeaturizeJob
    from pipelines.job.stream import actor_resources

    # 1 logical GPU: no CUDA here, so the actors' featurizers run on the CPU
    ray.init(address="local", num_cpus=3, num_gpus=1, include_dashboard=False, log_to_driver=False)
    settings = json.loads(sys.argv[1])
    config = FeaturizeConfig(**settings)
    resources = actor_resources(config)
    job = FeaturizeJob(config)
    free_gpu, done = [], threading.Event()

    def sample():  # the GPU left over while the job runs: 0 once both half-GPU actors hold theirs
        while not done.is_set():
            free_gpu.append(ray.available_resources().get("GPU", 0.0))
            done.wait(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    summary = job.run()
    done.set()
    sampler.join()
    print(json.dumps({"resources": resources, "min_free_gpu": min(free_gpu), "written": summary.rows_written, "ok": summary.ok}))
    """
)


def test_half_a_gpu_per_actor_packs_two_actors_on_one_gpu(tiny_text_dir: str, tmp_path: Path) -> None:
    texts = [f"sentence number {i} about topic {i % 5}" for i in range(24)]
    pq.write_table(pa.table({"id": [f"t{i}" for i in range(len(texts))], "text": texts}), tmp_path / "in.parquet")
    settings = dict(
        input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"), modality="text", model=f"hf:{tiny_text_dir}",
        objectives="kl", gpus_per_actor=0.5, batch_size=4,
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run(
        [sys.executable, "-c", SCHEDULING_CHILD, json.dumps(settings)], capture_output=True, text=True, env=env,
        cwd=tmp_path, timeout=300,
    )
    assert child.returncode == 0, child.stderr[-4000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["resources"] == [2, 0.5, 1.0]  # two actors, half a GPU and one CPU each
    assert result["min_free_gpu"] == 0.0  # both ran at once on the one GPU
    assert result["ok"] and result["written"] == len(texts)
