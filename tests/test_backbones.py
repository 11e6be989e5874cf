"""Backbone loading, target-layer resolution and the spec that pins both."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from fungi_ops import ConfigError, Featurizer, FeaturizerSpec, KLConfig, parse_objectives
from fungi_ops.backbones import default_target_layer, file_sha256, load_backbone


class NotATensor:
    """An arbitrary object: a checkpoint holding one must not be unpickled."""


def timm_spec(**overrides) -> FeaturizerSpec:
    fields = dict(model="timm:test_vit", modality="image", weights="random", objectives=(KLConfig(),), precision="fp32")
    fields.update(overrides)
    return FeaturizerSpec(**fields)


# -- target layer -----------------------------------------------------------------
def test_default_target_is_last_attention_projection_of_timm_vit() -> None:
    model = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=3, num_heads=2, num_classes=0)
    assert default_target_layer(model) == "blocks.2.attn.proj"


def test_default_target_of_hf_bert(minilm_dir: str) -> None:
    assert load_backbone(f"hf:{minilm_dir}", "text").default_target == "encoder.layer.5.attention.output.dense"


def test_default_target_of_hf_vit_and_ast(tiny_vit_dir: str, tiny_ast_dir: str) -> None:
    assert load_backbone(f"hf:{tiny_vit_dir}", "image").default_target == "layers.1.attention.o_proj"
    assert load_backbone(f"hf:{tiny_ast_dir}", "audio").default_target == "layers.1.attention.o_proj"


def test_missing_target_layer_fails_at_construction_naming_candidates() -> None:
    with pytest.raises(ConfigError, match=r"'blocks\.9\.attn\.proj' not found.*blocks\.5\.attn\.proj"):
        Featurizer(timm_spec(target_layer="blocks.9.attn.proj"), device="cpu")


def test_non_linear_target_layer_fails_at_construction() -> None:
    with pytest.raises(ConfigError, match=r"'blocks\.5\.attn' is a Attention, not an nn\.Linear"):
        Featurizer(timm_spec(target_layer="blocks.5.attn"), device="cpu")


def test_explicit_target_layer_is_used_and_recorded() -> None:
    featurizer = Featurizer(timm_spec(target_layer="blocks.2.mlp.fc2"), device="cpu")
    assert featurizer.spec.target_layer == "blocks.2.mlp.fc2"
    assert featurizer.tap.layer is featurizer.backbone.model.blocks[2].mlp.fc2


# -- weights ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_weights(tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    """A test_vit state dict that differs from the seeded random init, as safetensors."""
    model = load_backbone("timm:test_vit", "image", weights="random", seed=123).model
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    path = tmp_path_factory.mktemp("weights") / "test_vit.safetensors"
    save_file(state, str(path))
    return str(path), state


def test_local_safetensors_weights_are_loaded_exactly(saved_weights) -> None:
    path, state = saved_weights
    featurizer = Featurizer(timm_spec(weights=path), device="cpu")
    loaded = featurizer.backbone.model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[key], state[key]) for key in state)
    assert featurizer.spec.weights_sha256 == file_sha256(path)


def test_weights_hash_mismatch_is_refused(saved_weights) -> None:
    path, _ = saved_weights
    with pytest.raises(ConfigError, match="sha256"):
        Featurizer(timm_spec(weights=path, weights_sha256="0" * 64), device="cpu")


def test_pickle_with_arbitrary_objects_is_refused(tmp_path, saved_weights) -> None:
    _, state = saved_weights
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": state, "payload": NotATensor()}, path)
    with pytest.raises(ConfigError, match="weights_only"):
        Featurizer(timm_spec(weights=str(path)), device="cpu")


def test_plain_torch_state_dict_is_accepted(tmp_path, saved_weights) -> None:
    _, state = saved_weights
    path = tmp_path / "plain.pt"
    torch.save({"model": state}, path)
    loaded = Featurizer(timm_spec(weights=str(path)), device="cpu").backbone.model.state_dict()
    assert all(torch.equal(loaded[key], state[key]) for key in state)


def test_weights_of_another_architecture_are_refused(tmp_path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"something.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ConfigError, match="do not fit the model"):
        Featurizer(timm_spec(weights=str(path)), device="cpu")


def test_random_init_is_seeded() -> None:
    first = load_backbone("timm:test_vit", "image", weights="random", seed=5).model.state_dict()
    again = load_backbone("timm:test_vit", "image", weights="random", seed=5).model.state_dict()
    other = load_backbone("timm:test_vit", "image", weights="random", seed=6).model.state_dict()
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(first["blocks.0.attn.qkv.weight"], other["blocks.0.attn.qkv.weight"])


# -- text pooling -----------------------------------------------------------------
def test_sentence_transformers_pooling_is_the_default_and_overridable(minilm_dir: str) -> None:
    assert load_backbone(f"hf:{minilm_dir}", "text").pooling == "mean"
    assert load_backbone(f"hf:{minilm_dir}", "text", pooling="cls").pooling == "cls"
    with pytest.raises(ConfigError, match="pooling"):
        load_backbone(f"hf:{minilm_dir}", "text", pooling="max")


# -- spec -------------------------------------------------------------------------
def test_spec_json_round_trip_and_stable_hash() -> None:
    spec = FeaturizerSpec(
        model="timm:test_vit",
        modality="image",
        objectives=parse_objectives("simclr:temperature=0.1,kl,dino:local_crops_number=4"),
        seed=9,
    )
    again = FeaturizerSpec.from_json(spec.to_json())
    assert again == spec and again.hash == spec.hash
    # objectives are kept in the canonical order whatever order they were given in
    reordered = FeaturizerSpec(model="timm:test_vit", modality="image", objectives=tuple(reversed(spec.objectives)), seed=9)
    assert reordered.hash == spec.hash
    assert [o.name for o in spec.objectives] == ["kl", "dino", "simclr"]
    assert FeaturizerSpec(model="timm:test_vit", modality="image", objectives=spec.objectives, seed=10).hash != spec.hash


def test_resolved_spec_round_trips_and_reproduces_the_featurizer() -> None:
    featurizer = Featurizer(timm_spec(), device="cpu")
    resolved = featurizer.spec
    assert resolved.target_layer == "blocks.5.attn.proj" and resolved.embed_dim == 64 and resolved.projection_dim == 64
    again = Featurizer(FeaturizerSpec.from_json(resolved.to_json()), device="cpu")
    assert again.spec.hash == resolved.hash


def test_unknown_spec_fields_and_objective_parameters_are_refused() -> None:
    data = timm_spec().to_dict()
    data["colour"] = "blue"
    with pytest.raises(ConfigError, match="colour"):
        FeaturizerSpec.from_dict(data)
    with pytest.raises(ConfigError, match="no parameter"):
        parse_objectives("kl:temprature=3")
    with pytest.raises(ConfigError, match="unknown objective"):
        parse_objectives("byol")
