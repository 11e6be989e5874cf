"""Dense FUNGI: per-patch gradients against brute-force autograd, batch independence, the
support index, the dense spec and the dense Arrow schema.

Images run on a 2-block, 48-wide timm ViT with 8-px patches and 2 register tokens at
64 px (8 x 8 patches, 3 prefix tokens), fp32 on the CPU.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from conftest import png_bytes
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

import fungi_ops.dense as dense_module
import fungi_ops.dense_table as dense_table_module
import fungi_ops.featurizer as featurizer_module
from fungi_ops import ConfigError, Featurizer, FeaturizerSpec, parse_objectives
from fungi_ops.backbones import IMAGENET_MEAN, IMAGENET_STD
from fungi_ops.dense import DenseFeaturizer, make_dense_decoder
from fungi_ops.dense_table import (
    DenseReader,
    dense_batch_columns,
    dense_table,
    patch_feature_array,
    write_dense_parquet,
)
from fungi_ops.eval import EvalInputError, load_feature_table
from fungi_ops.neighbours import FLAT_LIMIT, NeighbourIndex, ivf_lists
from fungi_ops.objectives import DenseConfig
from fungi_ops.synthetic_scenes import make_scene

ATOL = 1e-5


@register_model
def fungi_dense_vit(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """8 x 8 patches of 8 px, a class token and 2 register tokens."""
    model = VisionTransformer(
        img_size=64, patch_size=8, embed_dim=48, depth=2, num_heads=2, reg_tokens=2, num_classes=kwargs.get("num_classes", 0)
    )
    model.pretrained_cfg = {"input_size": (3, 64, 64), "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop_pct": 0.875}
    return model


def dense_spec(params: str = "support_size=256;support_patches_per_image=16", **overrides) -> FeaturizerSpec:
    fields = dict(
        model="timm:fungi_dense_vit", modality="image", weights="random",
        objectives=parse_objectives(f"dense:{params}" if params else "dense"), precision="fp32",
    )
    fields.update(overrides)
    return FeaturizerSpec(**fields)


def scenes(first: int, count: int) -> list[np.ndarray]:
    return [make_scene(i, size=64)[0] for i in range(first, first + count)]


def with_support(featurizer: DenseFeaturizer) -> DenseFeaturizer:
    featurizer.setup(scenes(100, 16), [f"support{i}" for i in range(16)], batch_size=8)
    return featurizer


@pytest.fixture(scope="module")
def engine() -> DenseFeaturizer:
    return with_support(DenseFeaturizer(dense_spec(), device="cpu"))


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return scenes(0, 5)


def keys_for(samples: list) -> list[str]:
    return [f"row{i}" for i in range(len(samples))]


# -- per-patch gradients ------------------------------------------------------------
def brute_force_patch_features(featurizer: DenseFeaturizer, image: np.ndarray, key: str, patches: list[int]) -> np.ndarray:
    """One backward per patch: only that patch's token sees a live copy of the target layer."""
    model, layer = featurizer.backbone.model, featurizer.tap.layer
    pixels = featurizer.views([image])
    with torch.no_grad():
        tokens = featurizer._forward_tokens(pixels)
    negatives, keep = featurizer._negatives(tokens, [key])
    prefix = featurizer.tokens.prefix
    features = []
    for token in [prefix + patch for patch in patches]:
        weight = layer.weight.detach().clone().requires_grad_(True)
        bias = layer.bias.detach().clone().requires_grad_(True)

        def live_on_one_token(module, args, output, token=token, weight=weight, bias=bias):
            frozen = F.linear(args[0], module.weight.detach(), module.bias.detach()).clone()
            frozen[:, token] = F.linear(args[0][:, token], weight, bias)
            return frozen

        handle = layer.register_forward_hook(live_on_one_token)
        try:
            with torch.enable_grad():
                out = featurizer.tokens.forward(model, pixels)
                featurizer.objective.loss(out.double(), negatives, keep).sum().backward()
        finally:
            handle.remove()
        flat = torch.cat([weight.grad, bias.grad[:, None]], dim=1).reshape(1, -1)
        features.append(F.normalize(featurizer.projection(flat), dim=-1)[0])
    return torch.stack(features).numpy()


def test_patch_gradients_match_one_backward_per_patch(engine: DenseFeaturizer, images) -> None:
    result = engine.featurize(images[:2], ["a", "b"])
    assert result.grid == (8, 8) and not result.errors
    patches = [0, 5, 7, 18, 27, 36, 45, 56, 63]  # corners, edges, inside (a backward each)
    expected = brute_force_patch_features(engine, images[1], "b", patches)
    np.testing.assert_allclose(result.features["grad_dense"][1, patches], expected, atol=ATOL, rtol=0)


def test_features_do_not_depend_on_the_batch(engine: DenseFeaturizer, images) -> None:
    keys = keys_for(images)
    together = engine.featurize(images, keys)
    assert {name: values.shape for name, values in together.features.items()} == {
        "embedding": (5, 64, 48), "grad_dense": (5, 64, 48)
    }
    for index in range(len(images)):
        alone = engine.featurize(images[index : index + 1], keys[index : index + 1])
        for name in together.features:
            np.testing.assert_allclose(alone.features[name][0], together.features[name][index], atol=ATOL, rtol=0)
    for values in together.features.values():
        np.testing.assert_allclose(np.linalg.norm(values, axis=-1), 1.0, atol=1e-5)
    cosines = np.einsum("pd,qd->pq", together.features["grad_dense"][0], together.features["grad_dense"][0])
    assert cosines[~np.eye(64, dtype=bool)].max() < 0.9999  # every patch its own feature


def test_features_follow_the_payload_not_its_id(engine: DenseFeaturizer) -> None:
    """One image under several ids: bit-identical features in one batch and across batches
    (its negatives are drawn by its content key, which ``featurize`` takes as ``keys``)."""
    copy, other = png_bytes(64, 80, seed=5), png_bytes(64, 64, seed=6)
    first = engine.featurize_payloads([copy, other, copy], ["alpha", "other", "beta"])
    again = engine.featurize_payloads([copy, other, copy], ["gamma", "delta", "epsilon"])
    assert not first.errors and first.keys == ["alpha", "other", "beta"]
    for name, values in first.features.items():
        np.testing.assert_array_equal(values[0], values[2], err_msg=name)  # one batch, two ids
        np.testing.assert_array_equal(again.features[name], values, err_msg=name)  # another batch, other ids
    by_id = engine.featurize([engine.decode(copy)], ["alpha"])  # keyed by the id, other negatives are kept
    assert not np.allclose(by_id.features["grad_dense"][0], first.features["grad_dense"][0], atol=1e-4)


def test_chunking_of_forward_and_projection_does_not_change_features(engine, images, monkeypatch) -> None:
    keys = keys_for(images[:3])
    whole = engine.featurize(images[:3], keys).features
    monkeypatch.setattr(featurizer_module, "CPU_FORWARD_ELEMENTS", 1)
    monkeypatch.setattr(dense_module, "PROJECTION_ELEMENTS", {"cpu": 1, "accelerator": 1})
    chunked = engine.featurize(images[:3], keys).features
    for name in whole:
        np.testing.assert_allclose(chunked[name], whole[name], atol=ATOL, rtol=0)


def reference_info_nce(negatives: torch.Tensor, positives: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """``info_nce_loss`` of fungi-hummingbird/src/utils/simclr.py, in float64 instead of float16."""
    features = F.normalize(torch.cat([negatives, positives]), dim=-1)
    n = positives.shape[0]
    cosine = F.cosine_similarity(features[-n:, None, :], features[None, :, :], dim=-1)
    cosine = torch.diagonal_scatter(cosine, torch.full((n,), -10e3, dtype=cosine.dtype), cosine.shape[1] - n)
    positive = cosine[-n:, -n:] / temperature
    nll = -(positive - torch.diag(torch.diag(positive))).sum(dim=1) / (n - 1)
    return (nll + torch.logsumexp(cosine[-n:, :], dim=-1)).mean()


def test_loss_is_the_reference_info_nce(engine: DenseFeaturizer, images) -> None:
    with torch.no_grad():
        tokens = engine._forward_tokens(engine.views(images[:1])).double()
        negatives, keep = engine._negatives(tokens, ["a"])
        ours = engine.objective.loss(tokens, negatives, keep)[0]
        expected = reference_info_nce(negatives[0][keep[0]], engine.objective.latents(tokens[0]))
    assert 0.3 < keep.float().mean() < 0.7  # a random half of the 67 x 2 neighbours
    torch.testing.assert_close(ours, expected)


def test_negatives_are_the_nearest_support_patches(engine: DenseFeaturizer, images) -> None:
    with torch.no_grad():
        tokens = engine._forward_tokens(engine.views(images[:1]))
    negatives, _ = engine._negatives(tokens, ["a"])
    unit = F.normalize(tokens[0], dim=-1).numpy()
    support = engine.support.index.reconstruct_n(0, engine.support.size)
    nearest = np.argsort(-(unit @ support.T), axis=1)[:, :2]
    latents = engine.support_latents[torch.from_numpy(nearest.reshape(-1))].double()
    torch.testing.assert_close(negatives[0], latents)


def test_same_spec_same_features_other_seed_differs(images) -> None:
    runs = [with_support(DenseFeaturizer(dense_spec(seed=seed), device="cpu")) for seed in (0, 0, 3)]
    first, again, other = (run.featurize(images[:2], ["a", "b"]).features for run in runs)
    assert np.array_equal(first["grad_dense"], again["grad_dense"])
    assert not np.allclose(first["grad_dense"], other["grad_dense"], atol=1e-3)


# -- support ------------------------------------------------------------------------
def test_support_size_order_and_artifact_round_trip(engine: DenseFeaturizer, images, tmp_path) -> None:
    assert engine.support.size == 256 and engine.support.kind == "flat"  # 16 images x 16 patches
    assert engine.support_latents.shape == (256, 96)
    samples, keys = scenes(100, 16), [f"support{i}" for i in range(16)]
    blocks = engine.support_vectors(samples, keys)
    assert all(block.shape == (16, 48) for block in blocks.values())
    other = DenseFeaturizer(dense_spec(), device="cpu")
    other.install_support(dict(reversed(list(blocks.items()))))  # any order, same support
    assert np.array_equal(other.support.to_bytes(), engine.support.to_bytes())
    path = tmp_path / "setup.safetensors"
    engine.save_setup(path)
    restored = DenseFeaturizer(dense_spec(), device="cpu")
    assert restored.needs_setup
    restored.load_setup(path)
    assert not restored.needs_setup
    expected = engine.featurize(images[:2], ["a", "b"]).features["grad_dense"]
    assert np.array_equal(restored.featurize(images[:2], ["a", "b"]).features["grad_dense"], expected)
    with pytest.raises(ConfigError, match="belongs to spec"):
        DenseFeaturizer(dense_spec(seed=4), device="cpu").load_setup(path)


def test_featurize_needs_a_support(images) -> None:
    with pytest.raises(ConfigError, match="support index"):
        DenseFeaturizer(dense_spec(), device="cpu").featurize(images[:1], ["a"])


def test_support_cut_to_its_size() -> None:
    featurizer = DenseFeaturizer(dense_spec("support_size=40;support_patches_per_image=16"), device="cpu")
    assert featurizer.spec.setup_rows == 3
    featurizer.setup(scenes(100, 5), [f"s{i}" for i in range(5)])
    assert featurizer.support.size == 40


# -- neighbour index -------------------------------------------------------------------
def unit_rows(count: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, dim))
    x = centres[rng.integers(0, 40, count)] + 0.5 * rng.normal(size=(count, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_flat_index_is_exact_and_survives_serialisation() -> None:
    vectors, queries = unit_rows(500, 16, 0), unit_rows(30, 16, 1)
    index = NeighbourIndex.build(vectors, "flat", seed=0)
    similarities, indices = index.search(queries, 5)
    expected = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :5]
    assert np.array_equal(indices, expected)
    np.testing.assert_allclose(similarities, np.take_along_axis(queries @ vectors.T, expected, 1), atol=1e-5)
    again = NeighbourIndex.from_bytes(index.to_bytes().tobytes())
    assert again.kind == "flat" and np.array_equal(again.search(queries, 5)[1], indices)


@pytest.mark.parametrize("kind", ["ivf", "ivf-sq8"])
def test_ivf_indexes_are_deterministic_and_find_most_neighbours(kind: str) -> None:
    vectors, queries = unit_rows(6000, 32, 2), unit_rows(200, 32, 3)
    first = NeighbourIndex.build(vectors, kind, seed=0, probe=8)
    assert first.kind == kind and first._ivf.nlist == ivf_lists(6000) == 128
    assert np.array_equal(first.to_bytes(), NeighbourIndex.build(vectors, kind, seed=0, probe=8).to_bytes())
    _, found = first.search(queries, 10)
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)])
    assert recall > 0.85, recall
    restored = NeighbourIndex.from_bytes(first.to_bytes(), probe=8)
    assert np.array_equal(restored.search(queries, 10)[1], found)


def test_ivf_search_never_returns_missing_neighbours() -> None:
    vectors = unit_rows(400, 8, 4)
    index = NeighbourIndex.build(vectors, "ivf", seed=0, probe=1)  # 8 lists of ~50, one probed
    _, indices = index.search(unit_rows(50, 8, 5), 120)
    assert (indices >= 0).all()
    with pytest.raises(ValueError, match="k must be between"):
        index.search(vectors[:1], 401)


# -- spec ------------------------------------------------------------------------------
def test_dense_settings_are_part_of_the_spec(engine: DenseFeaturizer) -> None:
    spec = engine.spec
    assert spec.is_dense and spec.feature_names == ["embedding", "grad_dense"]
    config = spec.objectives[0]
    assert isinstance(config, DenseConfig) and (config.image_size, config.index) == (64, "flat")
    assert FeaturizerSpec.from_json(spec.to_json()).hash == spec.hash
    assert DenseConfig(support_size=FLAT_LIMIT).resolved("image").index == "flat"
    assert DenseConfig(support_size=FLAT_LIMIT + 1).resolved("image").index == "ivf-sq8"
    other = DenseFeaturizer(dense_spec("support_size=256;support_patches_per_image=16;num_neighbors=3"), device="cpu")
    assert other.spec.hash != spec.hash


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: FeaturizerSpec(model="timm:fungi_dense_vit", modality="image", objectives=parse_objectives("kl,dense")), "computed alone"),
        (lambda: Featurizer(dense_spec(), device="cpu"), "DenseFeaturizer"),
        (lambda: DenseFeaturizer(dense_spec(objectives=parse_objectives("kl")), device="cpu"), "not a dense spec"),
        (lambda: DenseFeaturizer(dense_spec("image_size=60"), device="cpu"), "not a multiple of the patch size 8"),
        (lambda: DenseFeaturizer(dense_spec("negative_fraction=0"), device="cpu"), r"negative_fraction must be in \(0, 1\]"),
        (lambda: DenseFeaturizer(dense_spec("index=hnsw"), device="cpu"), "dense.index must be"),
        (lambda: DenseConfig().for_backbone(SimpleNamespace(patch_tokens=None, model_id="timm:convnet", model=torch.nn.Conv2d(3, 8, 3))), "need a ViT's patch tokens"),
        (lambda: FeaturizerSpec(model="hf:x", modality="text", objectives=parse_objectives("dense")).objectives[0].resolved("text"), "supports image"),
    ],
)
def test_bad_dense_settings_are_refused(build, message) -> None:
    with pytest.raises(ConfigError, match=message):
        build()


def test_other_image_size_and_hugging_face_vit(tiny_vit_dir: str) -> None:
    """A Hugging Face ViT at 96 px (its position embedding interpolated), 6 x 6 patches of 16 px."""
    spec = FeaturizerSpec(
        model=f"hf:{tiny_vit_dir}", modality="image", weights="random", precision="fp32",
        objectives=parse_objectives("dense:image_size=96;support_size=64;support_patches_per_image=8"),
    )
    featurizer = DenseFeaturizer(spec, device="cpu")
    samples = [make_scene(i, size=96)[0] for i in range(10)]
    featurizer.setup(samples[2:], [f"s{i}" for i in range(8)])
    together = featurizer.featurize(samples[:2], ["a", "b"])
    assert together.grid == (6, 6) and together.features["grad_dense"].shape == (2, 36, 64)
    alone = featurizer.featurize(samples[1:2], ["b"])
    np.testing.assert_allclose(alone.features["grad_dense"][0], together.features["grad_dense"][1], atol=ATOL, rtol=0)


# -- decoding --------------------------------------------------------------------------
def test_decoder_resizes_the_whole_image_and_reports_bad_rows(engine: DenseFeaturizer) -> None:
    decoder = make_dense_decoder(engine.spec)
    assert decoder.decode(png_bytes(30, 200, seed=1)).shape == (64, 64, 3)
    result = engine.featurize_payloads([png_bytes(80, 50, seed=1), b"not an image", png_bytes(64, 64, seed=2)], ["a", "b", "c"])
    assert result.ok_rows == [0, 2] and result.errors[1].stage == "decode"
    assert result.features["embedding"].shape == (2, 64, 48)


# -- dense table -----------------------------------------------------------------------
def test_patch_arrays_wrap_the_features_without_copying() -> None:
    values = np.random.default_rng(0).normal(size=(3, 6, 4)).astype(np.float32)
    array = patch_feature_array(values)
    floats = array.values.values
    assert floats.buffers()[1].address == values.ctypes.data
    assert array.type == pa.list_(pa.list_(pa.float32(), 4))
    assert array.to_pylist()[2][5] == pytest.approx(values[2, 5].tolist())


def test_table_round_trip_with_failed_rows(engine: DenseFeaturizer, tmp_path, monkeypatch) -> None:
    payloads = [png_bytes(70, 90, seed=i) for i in range(5)]
    payloads[2] = b"broken"
    batch = engine.featurize_payloads(payloads, keys_for(payloads))
    columns = dense_batch_columns(batch)
    assert columns["embedding"].null_count == 1 and columns["grid_rows"].to_pylist()[2] is None
    table = pa.table({"id": keys_for(payloads), **columns})
    good = table.filter(pa.compute.is_valid(table.column("embedding")))
    monkeypatch.setattr(dense_table_module, "ROW_GROUP_BYTES", 5 * 64 * 48 * 4)  # 2.5 images: two a group
    write_dense_parquet(good.replace_schema_metadata({b"fungi.spec_hash": engine.spec.hash.encode()}), tmp_path / "part.parquet")
    assert pq.ParquetFile(tmp_path / "part.parquet").metadata.num_row_groups == 2
    reader = DenseReader(tmp_path)
    assert reader.n_rows == 4 and reader.dims == {"embedding": 48, "grad_dense": 48} and reader.spec_hash == engine.spec.hash
    rows = list(reader.batches(batch_rows=3))  # a batch never spans two row groups
    assert [list(r.ids) for r in rows] == [["row0", "row1"], ["row3", "row4"]]
    np.testing.assert_array_equal(rows[1].patches("grad_dense", 0), batch.features["grad_dense"][2])
    np.testing.assert_array_equal(rows[1].features["embedding"][64:], batch.features["embedding"][3])
    assert rows[0].grids.tolist() == [[8, 8]] * 2


def test_dense_table_helper_and_readers_refuse_the_wrong_kind(tmp_path) -> None:
    rng = np.random.default_rng(0)
    per_image = [rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(6, 3)).astype(np.float32)]
    table = dense_table(["a", "b"], np.array([[2, 2], [2, 3]]), {"embedding": per_image}, columns={"label": ["x", "y"]})
    write_dense_parquet(table, tmp_path / "dense.parquet")
    rows = next(DenseReader(tmp_path / "dense.parquet").batches(columns=["label"]))
    assert rows.offsets.tolist() == [0, 4, 10] and rows.columns["label"] == ["x", "y"]
    np.testing.assert_array_equal(rows.patches("embedding", 1), per_image[1])
    with pytest.raises(EvalInputError, match="per-patch features"):
        load_feature_table(tmp_path / "dense.parquet")
    pq.write_table(pa.table({"id": ["a"], "embedding": pa.FixedSizeListArray.from_arrays(pa.array([1.0, 0.0], pa.float32()), 2)}), tmp_path / "global.parquet")
    with pytest.raises(EvalInputError, match="not a dense feature table"):
        DenseReader(tmp_path / "global.parquet")
    with pytest.raises(ValueError, match="does not match"):
        dense_table(["a"], (2, 2), {"embedding": np.zeros((1, 3, 2), np.float32)})


def test_projection_budget_bounds_the_rank_one_buffer(engine: DenseFeaturizer) -> None:
    """The documented CPU budget: 905 ViT-Tiny patches (a batch of 4 at 224 px), 226 of ViT-S, 56 of ViT-B."""
    budget = dense_module.PROJECTION_ELEMENTS["cpu"]
    assert [budget // (d * (d + 1)) for d in (192, 384, 768)] == [905, 226, 56]
    assert engine.tap.gradient_dim == 48 * 49 and math.prod(engine.grid) == engine.patches
