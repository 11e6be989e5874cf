"""The featurizer end to end: batch independence, determinism, real text model, bad rows, setup.

Images run on a 2-block, 48-wide timm ViT at 64 px (registered below), text on the real
all-MiniLM-L6-v2, audio on a tiny random AST; all fp32 on the CPU.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import png_bytes, wav_bytes
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

import fungi_ops.featurizer as featurizer_module
from fungi_ops import ConfigError, Featurizer, FeaturizerSpec, SampleError, parse_objectives
from fungi_ops.adapters import ViewGroup
from fungi_ops.backbones import IMAGENET_MEAN, IMAGENET_STD
from fungi_ops.gradients import accumulate_linear_gradients, grouped_linear_gradients
from fungi_ops.seeding import content_hash

ATOL = 1e-5
IMAGE_SHAPES = [(375, 500), (500, 375), (64, 64), (40, 300), (300, 40), (97, 131), (700, 1000), (20, 30)]
TEXTS = [
    "A cat.",
    "The quick brown fox jumps over the lazy dog near the river bank at dawn.",
    "Gradient features from a frozen encoder.",
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty twenty-one twenty-two twenty-three twenty-four twenty-five",
    "Hello",
    "Paris is the capital of France, and Rome is the capital of Italy.",
    "Self-supervised objectives on top of random heads still give useful gradients?",
    "short text here",
]
NEGATIVE_TEXTS = ["a negative sentence", "another unrelated one", "weather is nice today", "stocks fell sharply"]
AUDIO_SECONDS = [0.3, 0.5, 0.9, 1.3, 2.0, 0.25, 1.0, 0.7]


@register_model
def fungi_tiny_vit(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A ViT small enough for many featurize calls on two cores (timm's test_vit takes 160 px)."""
    model = VisionTransformer(
        img_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=2, num_classes=kwargs.get("num_classes", 0)
    )
    model.pretrained_cfg = {"input_size": (3, 64, 64), "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop_pct": 0.875}
    return model


def image_spec(objectives: str = "kl,dino,simclr", **overrides) -> FeaturizerSpec:
    fields = dict(
        model="timm:fungi_tiny_vit", modality="image", weights="random", objectives=parse_objectives(objectives), precision="fp32"
    )
    fields.update(overrides)
    return FeaturizerSpec(**fields)


def with_negatives(featurizer: Featurizer, payloads: list) -> Featurizer:
    samples = [featurizer.decode(payload) for payload in payloads]
    featurizer.setup(samples, [f"negative{i}" for i in range(len(samples))], batch_size=2)
    return featurizer


def image_negatives() -> list[bytes]:
    return [png_bytes(48 + 8 * i, 64, seed=100 + i) for i in range(3)]


@pytest.fixture(scope="module")
def image_engine() -> Featurizer:
    return with_negatives(Featurizer(image_spec(), device="cpu"), image_negatives())


@pytest.fixture(scope="module")
def images(image_engine: Featurizer) -> list[np.ndarray]:
    return [image_engine.decode(png_bytes(h, w, seed=i)) for i, (h, w) in enumerate(IMAGE_SHAPES)]


@pytest.fixture(scope="module")
def text_engine(minilm_dir: str) -> Featurizer:
    spec = FeaturizerSpec(model=f"hf:{minilm_dir}", modality="text", objectives=parse_objectives("kl,simclr"), precision="fp32")
    return with_negatives(Featurizer(spec, device="cpu"), NEGATIVE_TEXTS)


@pytest.fixture(scope="module")
def audio_engine(tiny_ast_dir: str) -> Featurizer:
    spec = FeaturizerSpec(model=f"hf:{tiny_ast_dir}", modality="audio", objectives=parse_objectives("kl,simclr"), precision="fp32")
    return with_negatives(Featurizer(spec, device="cpu"), [wav_bytes(0.6, freq=200.0 + 100 * i) for i in range(3)])


def keys_for(samples: list) -> list[str]:
    return [f"row{i}" for i in range(len(samples))]


def assert_batch_independent(featurizer: Featurizer, samples: list) -> dict[str, np.ndarray]:
    keys = keys_for(samples)
    together = featurizer.featurize(samples, keys)
    assert not together.errors
    for index in range(len(samples)):
        alone = featurizer.featurize(samples[index : index + 1], keys[index : index + 1])
        for name in featurizer.feature_names:
            np.testing.assert_allclose(alone.features[name][0], together.features[name][index], atol=ATOL, rtol=0, err_msg=name)
    return together.features


def assert_unit_rows_that_differ(features: dict[str, np.ndarray]) -> None:
    for name, values in features.items():
        assert np.isfinite(values).all(), name
        np.testing.assert_allclose(np.linalg.norm(values, axis=1), 1.0, atol=1e-5, err_msg=name)
        cosines = values @ values.T
        assert cosines[~np.eye(len(values), dtype=bool)].max() < 0.9999, name


# -- batch independence -----------------------------------------------------------
def test_image_features_do_not_depend_on_the_batch(image_engine: Featurizer, images: list[np.ndarray]) -> None:
    features = assert_batch_independent(image_engine, images)
    assert list(features) == ["embedding", "grad_kl", "grad_dino", "grad_simclr"]
    assert all(values.shape == (len(images), 48) for values in features.values())
    assert_unit_rows_that_differ(features)


def test_text_features_do_not_depend_on_the_batch(text_engine: Featurizer) -> None:
    samples = [text_engine.decode(text) for text in TEXTS]
    assert_unit_rows_that_differ(assert_batch_independent(text_engine, samples))


def test_audio_features_do_not_depend_on_the_batch(audio_engine: Featurizer) -> None:
    samples = [audio_engine.decode(wav_bytes(s, freq=150.0 + 90 * i)) for i, s in enumerate(AUDIO_SECONDS)]
    assert len({sample.shape[0] for sample in samples}) > 4  # really different lengths
    assert_unit_rows_that_differ(assert_batch_independent(audio_engine, samples))


def test_forward_chunking_does_not_change_features(image_engine: Featurizer, images, monkeypatch) -> None:
    """One row per forward call (views of a sample spread over many chunks) vs all rows at once."""
    keys = keys_for(images[:3])
    monkeypatch.setattr(featurizer_module, "CPU_FORWARD_ELEMENTS", 1)
    chunked = image_engine.featurize(images[:3], keys).features
    monkeypatch.setattr(featurizer_module, "CPU_FORWARD_ELEMENTS", 1 << 40)
    whole = image_engine.featurize(images[:3], keys).features
    for name in whole:
        np.testing.assert_allclose(chunked[name], whole[name], atol=ATOL, rtol=0, err_msg=name)


def reference_gradients(inputs: torch.Tensor, grads: torch.Tensor, samples: int) -> torch.Tensor:
    """Per-sample [W | b] gradients, row o of W then b_o, summed over views and tokens."""
    x, g = inputs.unflatten(0, (samples, -1)), grads.unflatten(0, (samples, -1))
    weight = torch.einsum("svto,svti->soi", g, x)
    return torch.cat([weight, g.sum(dim=(1, 2))[..., None]], dim=2).flatten(1)


def test_accumulated_gradients_match_one_grouped_matmul() -> None:
    samples, views, tokens = 3, 5, 4
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(samples * views, tokens, 6, dtype=torch.float64, generator=generator)
    grads = torch.randn(samples * views, tokens, 7, dtype=torch.float64, generator=generator)
    expected = reference_gradients(inputs, grads, samples)
    torch.testing.assert_close(grouped_linear_gradients(inputs, grads, samples, with_bias=True), expected)
    total = torch.zeros_like(expected)
    for start, stop in [(0, 2), (2, 3), (3, 11), (11, 15)]:  # cuts inside and across samples
        accumulate_linear_gradients(total, inputs[start:stop], grads[start:stop], start, views, with_bias=True)
    torch.testing.assert_close(total, expected)


def test_tokens_without_gradient_are_skipped_exactly() -> None:
    """A pooled class token is the only token with a gradient; a NaN elsewhere still shows."""
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(6, 5, 4, dtype=torch.float64, generator=generator)
    grads = torch.randn(6, 5, 3, dtype=torch.float64, generator=generator)
    grads[:, 1:] = 0.0
    torch.testing.assert_close(grouped_linear_gradients(inputs, grads, 2, with_bias=True), reference_gradients(inputs, grads, 2))
    grads[4, 3, 1] = float("nan")
    assert torch.isnan(grouped_linear_gradients(inputs, grads, 2, with_bias=True)[1]).any()


# -- views ------------------------------------------------------------------------
def test_eval_view_is_the_centre_crop(image_engine: Featurizer, images) -> None:
    """Pixels, not interpolations: only the float32 rounding of grid coordinates remains."""
    adapter = image_engine.adapter
    size = adapter.settings.input_size
    for index in (0, 1, 3):
        sample = images[index]
        view = adapter.build_views([sample], ["k"], [ViewGroup("eval", 1)], 0, torch.device("cpu"))[0]
        top, left = round((sample.shape[0] - size) / 2), round((sample.shape[1] - size) / 2)
        crop = torch.tensor(sample[top : top + size, left : left + size]).permute(2, 0, 1).float()
        expected = (crop / 255.0 - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
        torch.testing.assert_close(view, expected, atol=2e-4, rtol=0)  # a neighbour's weight <= ~1e-5


def test_random_views_follow_the_content_key(image_engine: Featurizer, images) -> None:
    adapter, sample = image_engine.adapter, images[0]
    dino = [group for group in image_engine.groups if group.kind == "multicrop"]
    first = adapter.build_views([sample], ["a"], dino, 0, torch.device("cpu"))
    assert torch.equal(first, adapter.build_views([sample], ["a"], dino, 0, torch.device("cpu")))
    assert not torch.allclose(first, adapter.build_views([sample], ["b"], dino, 0, torch.device("cpu")))
    assert not torch.allclose(first, adapter.build_views([sample], ["a"], dino, 1, torch.device("cpu")))


def test_dino_boxes_lie_inside_the_image_with_the_configured_areas(image_engine: Featurizer) -> None:
    adapter = image_engine.adapter
    dino = next(group for group in image_engine.groups if group.kind == "multicrop")
    shapes = torch.tensor([[73.0, 97.0], [292.0, 73.0]], dtype=torch.float64)
    boxes = adapter.view_boxes(shapes, ["a", "b"], [dino], seed=0)  # [B, 12, 4]
    x0, y0, w, h = boxes.unbind(-1)
    heights, widths = shapes[:, :1], shapes[:, 1:]
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= widths).all() and (y0 + h <= heights).all()
    area = w * h / (heights * widths)
    assert (area[:, :2] >= 0.2).all() and (area[:, 2:] <= 0.3).all()


# -- features depend on content only ----------------------------------------------------
def assert_features_follow_the_payload_not_its_id(featurizer: Featurizer, payloads: list) -> None:
    """One payload under several ids: bit-identical features in one batch and across batches.

    The views are seeded by the payload's content key (what the job's ``content_hash``
    column holds), and ``featurize`` seeds them by the key it is given, so the equality
    below holds because ``featurize_payloads`` keys rows by content, not by id.
    """
    copy, other = payloads
    batch = [copy, other, copy]
    first = featurizer.featurize_payloads(batch, ["alpha", "other", "beta"])
    again = featurizer.featurize_payloads(batch, ["gamma", "delta", "epsilon"])
    alone = featurizer.featurize_payloads([copy], ["zeta"])
    keyed = featurizer.featurize([featurizer.decode(copy)], [content_hash(copy)])
    by_id = featurizer.featurize([featurizer.decode(copy)], ["alpha"])
    assert not first.errors and first.keys == ["alpha", "other", "beta"]
    for name in featurizer.feature_names:
        values = first.features[name]
        np.testing.assert_array_equal(values[0], values[2], err_msg=name)  # one batch, two ids
        np.testing.assert_array_equal(again.features[name], values, err_msg=name)  # another batch, other ids
        np.testing.assert_array_equal(keyed.features[name], alone.features[name], err_msg=name)  # the job's key
        np.testing.assert_allclose(alone.features[name][0], values[0], atol=ATOL, rtol=0, err_msg=name)
    # keyed by the id, the random views (DINO crops, text deletions, audio crops) differ
    assert any(not np.allclose(by_id.features[n], alone.features[n], atol=1e-3) for n in featurizer.feature_names)


def test_image_features_follow_the_payload_not_its_id(image_engine: Featurizer) -> None:
    assert_features_follow_the_payload_not_its_id(image_engine, [png_bytes(90, 120, seed=7), png_bytes(64, 64, seed=8)])


def test_text_features_follow_the_payload_not_its_id(text_engine: Featurizer) -> None:
    assert_features_follow_the_payload_not_its_id(text_engine, [TEXTS[1], TEXTS[6]])


def test_audio_features_follow_the_payload_not_its_id(audio_engine: Featurizer) -> None:
    assert_features_follow_the_payload_not_its_id(audio_engine, [wav_bytes(1.1, freq=330.0), wav_bytes(0.6, freq=500.0)])


def test_content_key_of_text_is_its_utf8_and_of_an_array_its_shape_and_values() -> None:
    assert content_hash("été") == content_hash("été".encode()) != content_hash("ete")
    pixels = np.arange(24, dtype=np.uint8).reshape(2, 4, 3)
    assert content_hash(pixels) == content_hash(pixels.copy()) != content_hash(pixels.reshape(4, 2, 3))
    with pytest.raises(SampleError, match="payload is a int"):
        content_hash(42)


# -- determinism ------------------------------------------------------------------
def test_same_spec_same_features_other_seed_differs(images) -> None:
    samples, keys = images[:3], keys_for(images[:3])
    runs = [with_negatives(Featurizer(image_spec(seed=seed), device="cpu"), image_negatives()) for seed in (0, 0, 1)]
    first, again, other = (run.featurize(samples, keys).features for run in runs)
    for name in first:
        assert np.array_equal(first[name], again[name]), name
        assert not np.allclose(first[name], other[name], atol=1e-3), name


def test_bf16_autocast_path_stays_close_to_fp32(image_engine: Featurizer, images) -> None:
    """The GPU configuration (bf16 autocast, bf16 projection, float64 losses) on the CPU."""
    bf16 = Featurizer(image_spec(precision="bf16"), device="cpu")
    assert bf16.projection.matrix.dtype == torch.bfloat16 and bf16.compute_dtype == torch.bfloat16
    bf16.objectives["simclr"].set_negatives(image_engine.objectives["simclr"].negatives)
    samples, keys = images[:3], keys_for(images[:3])
    low = bf16.featurize(samples, keys).features
    full = image_engine.featurize(samples, keys).features
    for name in full:
        assert np.isfinite(low[name]).all(), name
        assert (low[name] * full[name]).sum(axis=1).min() > 0.999, name


def test_explicit_projection_must_have_the_right_shape() -> None:
    with pytest.raises(ConfigError, match="projection must be 48 x"):
        Featurizer(image_spec("kl"), device="cpu", projection=torch.ones(48, 10))


# -- real text model ----------------------------------------------------------------
def test_minilm_features_have_the_right_shape_and_differ(text_engine: Featurizer) -> None:
    assert text_engine.spec.pooling == "mean"
    assert text_engine.spec.target_layer == "encoder.layer.5.attention.output.dense"
    result = text_engine.featurize_payloads(["The cat sat on the mat.", "Quarterly revenue rose by ten percent."], ["a", "b"])
    assert result.ok_rows == [0, 1]
    assert {name: values.shape for name, values in result.features.items()} == {
        "embedding": (2, 384),
        "grad_kl": (2, 384),
        "grad_simclr": (2, 384),
    }
    assert_unit_rows_that_differ(result.features)


def test_minilm_cls_pooling(minilm_dir: str, text_engine: Featurizer) -> None:
    spec = FeaturizerSpec(
        model=f"hf:{minilm_dir}", modality="text", objectives=parse_objectives("kl"), pooling="cls", precision="fp32"
    )
    cls = Featurizer(spec, device="cpu")
    assert cls.spec.pooling == "cls" and cls.spec.hash != text_engine.spec.hash
    texts = ["The cat sat on the mat.", "Quarterly revenue rose by ten percent."]
    features = cls.featurize_payloads(texts, ["a", "b"]).features
    assert_unit_rows_that_differ(features)
    mean = text_engine.featurize_payloads(texts, ["a", "b"]).features
    assert not np.allclose(features["embedding"], mean["embedding"], atol=1e-3)


# -- bad rows -----------------------------------------------------------------------
def assert_rows_fail_alone(featurizer: Featurizer, payloads: list, bad: dict[int, str]) -> None:
    keys = keys_for(payloads)
    result = featurizer.featurize_payloads(payloads, keys)
    assert sorted(result.errors) == sorted(bad)
    for row, message in bad.items():
        assert message in str(result.errors[row]), (row, result.errors[row])
        assert result.errors[row].stage == "decode"
    good = [row for row in range(len(payloads)) if row not in bad]
    assert result.ok_rows == good
    alone = featurizer.featurize_payloads([payloads[row] for row in good], [keys[row] for row in good])
    for name in featurizer.feature_names:
        np.testing.assert_allclose(result.features[name], alone.features[name], atol=ATOL, rtol=0)


def test_bad_images_are_reported_per_row(image_engine: Featurizer) -> None:
    payloads = [png_bytes(80, 60, seed=1), b"definitely not an image", png_bytes(50, 90, seed=2), b"", png_bytes(64, 64, seed=3)[:40]]
    assert_rows_fail_alone(image_engine, payloads, {1: "cannot decode image", 3: "empty", 4: "cannot decode image"})


def test_bad_texts_are_reported_per_row(text_engine: Featurizer) -> None:
    payloads = ["A perfectly fine sentence.", "", "   \n\t ", b"\xff\xfe\xfd", "Another fine one.", 42]
    assert_rows_fail_alone(text_engine, payloads, {1: "empty", 2: "empty", 3: "UTF-8", 5: "must be a string"})


def test_bad_audio_is_reported_per_row(audio_engine: Featurizer) -> None:
    payloads = [wav_bytes(0.8), wav_bytes(0.05), wav_bytes(0.8, nan=True), b"RIFF garbage", wav_bytes(0.4, freq=880.0)]
    assert_rows_fail_alone(audio_engine, payloads, {1: "needs at least", 2: "NaN", 3: "cannot decode audio"})


def test_empty_batch_gives_empty_features(image_engine: Featurizer) -> None:
    result = image_engine.featurize([], [])
    assert {name: values.shape for name, values in result.features.items()} == {
        name: (0, 48) for name in image_engine.feature_names
    }


# -- setup artifact -------------------------------------------------------------------
def test_simclr_needs_negatives_first(images) -> None:
    with pytest.raises(ConfigError, match="no negatives"):
        Featurizer(image_spec("simclr"), device="cpu").featurize(images[:1], ["a"])


def test_setup_artifact_round_trip(image_engine: Featurizer, images, tmp_path) -> None:
    path = tmp_path / "setup.safetensors"
    image_engine.save_setup(path)
    restored = Featurizer(image_spec(), device="cpu")
    assert restored.needs_setup
    restored.load_setup(path)
    assert torch.equal(restored.objectives["simclr"].negatives, image_engine.objectives["simclr"].negatives)
    samples, keys = images[:2], keys_for(images[:2])
    expected = image_engine.featurize(samples, keys).features["grad_simclr"]
    assert np.array_equal(restored.featurize(samples, keys).features["grad_simclr"], expected)
    with pytest.raises(ConfigError, match="belongs to spec"):
        Featurizer(image_spec(seed=4), device="cpu").load_setup(path)


@pytest.mark.parametrize("params", ["num_negatives=-4", "latent_dim=-8"])
def test_negative_simclr_sizes_are_refused(params):
    from fungi_ops.objectives import make_objective_config

    name = params.split("=")[0]
    config = make_objective_config("simclr", **{name: int(params.split("=")[1])})
    with pytest.raises(ConfigError, match=rf"simclr\.{name} must be > 0"):
        config.resolved("text")
