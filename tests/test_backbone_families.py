"""The paper's backbone families (README "Models and weights"): each loads from its configuration
with random weights (no download), featurizes with every objective of its modality, targets the
attention output projection of its last block and embeds with the family's pooling.

timm families are checked twice: the full-size model named in the README, built on the meta
device (no memory, no forward), for the default target layer and the pooling settings; and the
same architecture shrunk (depth 2, width 32, 2x2 patches) through fungi's own loader, for a
featurize run and the embedding's token. Hugging Face families are small configurations of the
real classes, saved with ``save_pretrained`` and loaded as ``hf:<dir>`` like a user's checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import timm
import torch
import transformers
from conftest import png_bytes, wav_bytes
from timm.layers import LayerScale
from torch import nn

from fungi_ops import ConfigError, Featurizer, FeaturizerSpec, parse_objectives
from fungi_ops.backbones import default_target_layer, load_backbone

OBJECTIVES = {
    "image": "kl,dino:local_crops_number=2,simclr:num_negatives=3",
    "text": "kl,simclr:num_negatives=3;text_views=3",
    "audio": "kl,simclr:num_negatives=3;audio_views=3",
}
SHRUNK_WIDTH = 32


@dataclass(frozen=True)
class TimmFamily:
    """A timm pretrained name and what the README says of it."""

    name: str
    target: str  # default target layer of the full-size model
    pooling: str  # timm's global_pool: "token" (class token) or "avg" (mean of patch tokens)
    prefix: int  # class (+ distillation / register) tokens before the patches


TIMM_FAMILIES = [
    TimmFamily("vit_small_patch16_224.augreg_in21k", "blocks.11.attn.proj", "token", 1),
    TimmFamily("vit_base_patch16_224.augreg_in1k", "blocks.11.attn.proj", "token", 1),
    TimmFamily("vit_base_patch16_224.augreg2_in21k_ft_in1k", "blocks.11.attn.proj", "token", 1),
    TimmFamily("vit_large_patch16_224.augreg_in21k", "blocks.23.attn.proj", "token", 1),
    TimmFamily("deit_small_patch16_224.fb_in1k", "blocks.11.attn.proj", "token", 1),
    TimmFamily("deit_small_distilled_patch16_224.fb_in1k", "blocks.11.attn.proj", "token", 2),
    TimmFamily("deit3_base_patch16_224.fb_in1k", "blocks.11.attn.proj", "token", 1),
    TimmFamily("vit_small_patch16_224.dino", "blocks.11.attn.proj", "token", 1),
    TimmFamily("vit_base_patch16_224.dino", "blocks.11.attn.proj", "token", 1),
    TimmFamily("vit_small_patch14_dinov2.lvd142m", "blocks.11.attn.proj", "token", 1),
    TimmFamily("vit_base_patch14_dinov2.lvd142m", "blocks.11.attn.proj", "token", 1),
    TimmFamily("vit_small_patch14_reg4_dinov2.lvd142m", "blocks.11.attn.proj", "token", 5),
    TimmFamily("vit_base_patch14_reg4_dinov2.lvd142m", "blocks.11.attn.proj", "token", 5),
    TimmFamily("vit_base_patch16_224.mae", "blocks.11.attn.proj", "token", 1),
    TimmFamily("vit_base_patch16_clip_224.openai", "blocks.11.attn.proj", "token", 1),
    TimmFamily("vit_large_patch14_clip_224.openai", "blocks.23.attn.proj", "token", 1),
    TimmFamily("eva02_base_patch16_clip_224.merged2b", "blocks.11.attn.proj", "token", 1),
    TimmFamily("eva02_base_patch14_224.mim_in22k", "blocks.11.attn.proj", "avg", 1),
]


@pytest.fixture(scope="module")
def timm_pretrained_names() -> set[str]:
    return set(timm.list_models(pretrained=True))


def full_size_timm(name: str) -> nn.Module:
    """The model as fungi's loader creates it (``num_classes=0``), on the meta device: no memory."""
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, num_classes=0)


@pytest.fixture()
def shrunk_timm(monkeypatch) -> Callable[[str], int]:
    """Make timm.create_model build a 2-block, 32-wide version of an architecture at 2x2 patches;
    returns the input side for a model name. Everything else (classes, token layout, pooling,
    norms, rope, layer scale) stays the family's own."""
    original = timm.create_model

    def full_size(name: str) -> nn.Module:
        with torch.device("meta"):
            return original(name, pretrained=False, num_classes=0)

    def side(name: str) -> int:
        return 2 * full_size(name).patch_embed.patch_size[0]

    def create_model(name: str, **kwargs):
        size = side(name)
        shrink = dict(depth=2, embed_dim=SHRUNK_WIDTH, num_heads=2, img_size=size)
        if isinstance(getattr(full_size(name).blocks[0], "ls1", None), LayerScale):
            # layer scale starts at 1e-5..1e-6: random blocks would be near identities and every
            # image would embed alike; 1.0 keeps the module, as trained checkpoints have it
            shrink["init_values"] = 1.0
        return original(name, **kwargs, **shrink, pretrained_cfg_overlay={"input_size": (3, size, size)})

    monkeypatch.setattr(timm, "create_model", create_model)
    return side


def featurize_two(model: str, modality: str, payloads: list, negatives: list) -> Featurizer:
    """A featurizer with every objective of the modality, its negatives set up, and the features
    of two payloads checked: one unit-norm, finite, distinct row each, ``embed_dim`` wide.

    Rows need only differ: with random weights, layer scale (DeiT III, DINOv2: 1e-5 at init)
    leaves every block nearly the identity, so two images embed at a cosine of 0.9999."""
    spec = FeaturizerSpec(model=model, modality=modality, weights=None if model.startswith("hf:") else "random",
                          objectives=parse_objectives(OBJECTIVES[modality]), precision="fp32")
    featurizer = Featurizer(spec, device="cpu")
    featurizer.setup([featurizer.decode(p) for p in negatives], [f"negative{i}" for i in range(len(negatives))])
    batch = featurizer.featurize_payloads(payloads, ["a", "b"])
    assert not batch.errors
    expected = ["embedding", "grad_kl", "grad_dino", "grad_simclr"] if modality == "image" else ["embedding", "grad_kl", "grad_simclr"]
    assert list(batch.features) == expected
    for name, values in batch.features.items():
        assert values.shape == (2, featurizer.backbone.embed_dim), name
        assert np.isfinite(values).all(), name
        np.testing.assert_allclose(np.linalg.norm(values, axis=1), 1.0, atol=1e-5, err_msg=name)
        assert np.abs(values[0] - values[1]).max() > 1e-4, name
    return featurizer


# -- timm -------------------------------------------------------------------------
@pytest.mark.parametrize("family", TIMM_FAMILIES, ids=lambda f: f.name)
def test_timm_family_is_pretrained_and_targets_its_last_attention_projection(family, timm_pretrained_names) -> None:
    assert family.name in timm_pretrained_names
    model = full_size_timm(family.name)
    assert default_target_layer(model) == family.target
    assert isinstance(model.get_submodule(family.target), nn.Linear)
    assert model.global_pool == family.pooling
    assert model.num_prefix_tokens == family.prefix


# One featurize run per distinct architecture: the other names differ from one of these only in
# size and in their weights' tag (AugReg, DINO and MAE ViT-B/16 are one timm architecture).
SHRUNK_RUNS = [
    family for family in TIMM_FAMILIES
    if family.name in {
        "vit_base_patch16_224.augreg2_in21k_ft_in1k", "deit_small_distilled_patch16_224.fb_in1k",
        "deit3_base_patch16_224.fb_in1k", "vit_small_patch14_dinov2.lvd142m", "vit_small_patch14_reg4_dinov2.lvd142m",
        "vit_base_patch16_224.mae", "vit_base_patch16_clip_224.openai", "eva02_base_patch16_clip_224.merged2b",
        "eva02_base_patch14_224.mim_in22k",
    }
]


@pytest.mark.parametrize("family", SHRUNK_RUNS, ids=lambda f: f.name)
def test_timm_family_featurizes_and_embeds_with_its_pooling(family, shrunk_timm) -> None:
    side = shrunk_timm(family.name)
    images = [png_bytes(side + 9 * i, side + 5, seed=i) for i in range(2)]
    featurizer = featurize_two(f"timm:{family.name}", "image", images, [png_bytes(side, side + 3, seed=10 + i) for i in range(3)])
    assert featurizer.spec.target_layer == "blocks.1.attn.proj"
    assert featurizer.backbone.embed_dim == SHRUNK_WIDTH  # no head: the CLIP projection is dropped too
    model = featurizer.backbone.model
    pixels = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = model.forward_features(pixels)
        embedding = featurizer.backbone.embed(pixels)
    assert tokens.shape[1] == family.prefix + 4  # every patch: nothing masked (MAE) or dropped
    if family.pooling == "avg":
        expected = model.fc_norm(tokens[:, family.prefix :].mean(dim=1))
    elif family.prefix == 2:  # DeiT distilled: the mean of the class and distillation tokens
        expected = (tokens[:, 0] + tokens[:, 1]) / 2
    else:  # the class token, never a register
        expected = tokens[:, 0]
    torch.testing.assert_close(embedding, expected)


# -- Hugging Face -----------------------------------------------------------------
SMALL = dict(hidden_size=SHRUNK_WIDTH, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
WITH_TOKEN_TYPES = ["input_ids", "token_type_ids", "attention_mask"]
NO_TOKEN_TYPES = ["input_ids", "attention_mask"]


@dataclass(frozen=True)
class HFTextFamily:
    """A small random model of a text family, the inputs its real tokenizer gives, its target layer."""

    build: Callable[[int], nn.Module]  # vocabulary size -> model
    input_names: list[str]
    target: str


HF_TEXT_FAMILIES = {
    "bert": HFTextFamily(lambda v: transformers.BertModel(transformers.BertConfig(vocab_size=v, **SMALL), add_pooling_layer=False),
                         WITH_TOKEN_TYPES, "encoder.layer.1.attention.output.dense"),
    "roberta": HFTextFamily(lambda v: transformers.RobertaModel(transformers.RobertaConfig(vocab_size=v, **SMALL), add_pooling_layer=False),
                            NO_TOKEN_TYPES, "encoder.layer.1.attention.output.dense"),
    "distilbert": HFTextFamily(
        lambda v: transformers.DistilBertModel(transformers.DistilBertConfig(vocab_size=v, dim=SHRUNK_WIDTH, n_layers=2, n_heads=2, hidden_dim=64)),
        NO_TOKEN_TYPES, "transformer.layer.1.attention.out_lin"),
    "mpnet": HFTextFamily(lambda v: transformers.MPNetModel(transformers.MPNetConfig(vocab_size=v, **SMALL), add_pooling_layer=False),
                          NO_TOKEN_TYPES, "encoder.layer.1.attention.attn.o"),
    "deberta-v2": HFTextFamily(lambda v: transformers.DebertaV2Model(transformers.DebertaV2Config(vocab_size=v, **SMALL)),
                               WITH_TOKEN_TYPES, "encoder.layer.1.attention.output.dense"),
    "electra": HFTextFamily(lambda v: transformers.ElectraModel(transformers.ElectraConfig(vocab_size=v, embedding_size=SHRUNK_WIDTH, **SMALL)),
                            WITH_TOKEN_TYPES, "encoder.layer.1.attention.output.dense"),
    "modernbert": HFTextFamily(lambda v: transformers.ModernBertModel(transformers.ModernBertConfig(vocab_size=v, pad_token_id=0, **SMALL)),
                               NO_TOKEN_TYPES, "layers.1.attn.Wo"),
    "t5": HFTextFamily(
        lambda v: transformers.T5EncoderModel(transformers.T5Config(vocab_size=v, d_model=SHRUNK_WIDTH, num_layers=2, num_heads=2, d_ff=64, d_kv=16)),
        NO_TOKEN_TYPES, "encoder.block.1.layer.0.SelfAttention.o"),
}
TEXTS = ["Gradient features from a frozen encoder.", "The quick brown fox jumps over the lazy dog."]
NEGATIVE_TEXTS = ["a negative sentence", "weather is nice today", "stocks fell sharply"]


@pytest.mark.parametrize("family", list(HF_TEXT_FAMILIES))
def test_hf_text_family_featurizes_from_its_saved_configuration(family, minilm_dir, tmp_path) -> None:
    """A WordPiece tokenizer (all-MiniLM's) stands in for each family's own: the model's
    classes, layer names and forward are the family's, the token ids only need to fit."""
    spec = HF_TEXT_FAMILIES[family]
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir, model_input_names=spec.input_names)
    tokenizer.save_pretrained(tmp_path)
    torch.manual_seed(0)
    spec.build(tokenizer.vocab_size).save_pretrained(tmp_path)
    featurizer = featurize_two(f"hf:{tmp_path}", "text", TEXTS, NEGATIVE_TEXTS)
    assert featurizer.spec.target_layer == spec.target
    assert featurizer.spec.pooling == "cls"  # the first token: [CLS] / <s>, and T5's first token as the paper's code
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = featurizer.backbone.model(**batch).last_hidden_state
    torch.testing.assert_close(featurizer.backbone.embed(dict(batch)), hidden[:, 0])


def save_hf(model: nn.Module, directory) -> str:
    model.save_pretrained(directory)
    return f"hf:{directory}"


IMAGE_SIDE = 32  # 2x2 patches of 16 (and 14 for DINOv2, which interpolates its position embedding)


def hf_image_families() -> dict[str, Callable[[], nn.Module]]:
    vision = dict(SMALL, image_size=IMAGE_SIDE, patch_size=16)
    return {
        "dinov2": lambda: transformers.Dinov2Model(transformers.Dinov2Config(**vision)),
        "dinov2_with_registers": lambda: transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(**vision, num_register_tokens=4)),
        # the two-tower checkpoint, as openai/clip-vit-base-patch16 ships it: fungi takes the vision tower
        "clip": lambda: transformers.CLIPModel(transformers.CLIPConfig(
            vision_config=vision, text_config=dict(SMALL, vocab_size=64), projection_dim=16)),
        "vit_mae": lambda: transformers.ViTMAEModel(transformers.ViTMAEConfig(**vision)),
    }


@pytest.mark.parametrize("family", list(hf_image_families()))
def test_hf_image_family_featurizes_and_embeds_the_class_token(family, tmp_path) -> None:
    torch.manual_seed(0)
    model_id = save_hf(hf_image_families()[family](), tmp_path)
    images = [png_bytes(40 + 9 * i, 45, seed=i) for i in range(2)]
    featurizer = featurize_two(model_id, "image", images, [png_bytes(40, 43, seed=10 + i) for i in range(3)])
    model = featurizer.backbone.model
    expected_target = {"clip": "encoder.layers.1.self_attn.out_proj", "vit_mae": "layers.1.attention.o_proj"}
    assert featurizer.spec.target_layer == expected_target.get(family, "encoder.layer.1.attention.o_proj")
    assert type(model).__name__ == {"clip": "CLIPVisionModel"}.get(family, type(model).__name__)
    pixels = torch.randn(2, 3, IMAGE_SIDE, IMAGE_SIDE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embedding = featurizer.backbone.embed(pixels)
        again = featurizer.backbone.embed(pixels)
        if family == "vit_mae":
            hidden = model(pixel_values=pixels, noise=torch.arange(4.0).expand(2, 4)).last_hidden_state
        else:
            hidden = model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(embedding, again, rtol=0, atol=0)  # MAE: no random masking left
    prefix = 1 + (4 if family == "dinov2_with_registers" else 0)
    assert hidden.shape[1] == prefix + 4  # every patch is encoded
    if family == "clip":  # CLIP's pooled output: post-layernorm of the class token (no projection)
        torch.testing.assert_close(embedding, model.post_layernorm(hidden[:, 0]))
    else:  # the class token after the final norm, never a register
        torch.testing.assert_close(embedding, hidden[:, 0])


def test_hf_ast_family_featurizes_with_the_audio_objectives(tiny_ast_dir: str) -> None:
    clips = [wav_bytes(0.8, freq=300.0), wav_bytes(1.1, freq=700.0)]
    featurizer = featurize_two(f"hf:{tiny_ast_dir}", "audio", clips, [wav_bytes(0.6, freq=200.0 + 100 * i) for i in range(3)])
    assert featurizer.spec.target_layer == "layers.1.attention.o_proj"
    assert featurizer.spec.pooling == "pooler"  # mean of the class and distillation tokens after the norm
    spectrogram = featurizer.adapter.build_views([featurizer.decode(clips[0])], ["a"], featurizer.groups[:1], 0, torch.device("cpu"))
    with torch.no_grad():
        hidden = featurizer.backbone.model(input_values=spectrogram).last_hidden_state
    torch.testing.assert_close(featurizer.backbone.embed(spectrogram), (hidden[:, 0] + hidden[:, 1]) / 2)


def test_clip_projection_is_kept_on_request_and_refused_elsewhere(shrunk_timm) -> None:
    """``--pooling proj``: the CLIP image embedding the paper used (timm's 512-d head kept)."""
    plain = load_backbone("timm:vit_base_patch16_clip_224.openai", "image", weights="random")
    projected = load_backbone("timm:vit_base_patch16_clip_224.openai", "image", weights="random", pooling="proj")
    assert (plain.embed_dim, plain.pooling, projected.embed_dim, projected.pooling) == (SHRUNK_WIDTH, None, 512, "proj")
    assert projected.default_target == plain.default_target == "blocks.1.attn.proj"
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(projected.embed(pixels), projected.model.head(projected.model.forward_head(
            projected.model.forward_features(pixels), pre_logits=True)))
    for name in ("vit_base_patch16_clip_224.openai_ft_in1k", "vit_base_patch16_224.augreg_in1k"):
        with pytest.raises(ConfigError, match="no projection head"):
            load_backbone(f"timm:{name}", "image", weights="random", pooling="proj")
    with pytest.raises(ConfigError, match="no --pooling but 'proj'"):
        load_backbone("timm:vit_base_patch16_224.augreg_in1k", "image", weights="random", pooling="mean")
