"""Frozen encoders behind one interface: load by id, embed a batch, name the target layer.

Model ids are what a user types:

* ``timm:<name>``: a timm model (``num_classes=0`` so that it returns its pooled
  embedding), image modality.
* ``hf:<hub id or local directory>``: a Hugging Face encoder; BERT-like text models,
  ViT / DINOv2 / CLIP-vision image models, AST audio models.

``weights`` selects the parameters: ``None`` loads the pretrained weights the id names
(timm's or the Hugging Face checkpoint), a path loads a local ``.safetensors`` or
PyTorch checkpoint (``torch.load(weights_only=True)``: never unpickled), and ``"random"``
gives a random initialisation drawn from the run seed, identical on every worker (for
tests and benchmarks).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from fungi_ops.errors import ConfigError
from fungi_ops.seeding import derive_seed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_WEIGHTS = "random"

# Attention output projections of transformer blocks, across model families: timm ViT / EVA
# (attn.proj), BERT / RoBERTa / DeBERTa / ELECTRA (attention.output.dense), HF ViT / DINOv2 /
# AST / CLIP (o_proj, out_proj), DistilBERT (out_lin), MPNet (attention.attn.o), ModernBERT
# (attn.Wo) and the T5 encoder (block.N.layer.0.SelfAttention.o).
_TARGET_PATTERN = re.compile(
    r"(?:^|\.)(?:blocks|block|layer|layers)\.(\d+)\."
    r"(?:attn\.proj|attention\.output\.dense|(?:self_attn|attention|attn)\.(?:out_proj|o_proj)"
    r"|attention\.out_lin|attention\.attn\.o|attn\.Wo|layer\.0\.SelfAttention\.o)$"
)
_HF_POOLER_TYPES = {"dinov2", "clip_vision_model", "siglip_vision_model", "audio-spectrogram-transformer"}
# Hugging Face families whose AutoModel is not the bare encoder: T5's is the encoder-decoder
# (it needs decoder inputs), CLIP's the two-tower model (its vision tower is the image encoder).
_HF_ENCODER_CLASSES = {
    "t5": "T5EncoderModel",
    "mt5": "MT5EncoderModel",
    "umt5": "UMT5EncoderModel",
    "clip_vision_model": "CLIPVisionModel",
}


@dataclass(frozen=True)
class ImageInput:
    """How the model expects images: square input side, normalisation, eval resize ratio."""

    input_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 0.875

    @property
    def resize_size(self) -> int:
        """Shorter side of the eval resize (before the centre crop), as timm computes it."""
        return int(self.input_size / self.crop_pct)


@dataclass(frozen=True)
class TextInput:
    """How the model expects text: the longest tokenised input (longer texts are truncated)."""

    max_length: int = 512


@dataclass(frozen=True)
class AudioInput:
    """Kaldi fbank settings of AST-style models (defaults: AudioSet AST)."""

    sample_rate: int = 16000
    num_mel_bins: int = 128
    max_frames: int = 1024
    mean: float = -4.2677393
    std: float = 4.5689974
    patch_frames: int = 16


@dataclass(frozen=True)
class PatchTokens:
    """How to read a ViT's last-layer tokens (for dense features), at any square input side.

    ``forward``: ``(model, pixels [B, 3, S, S]) -> [B, prefix + (S / patch_size)^2, D]``, the
    tokens after the final norm, class and register tokens (``prefix`` of them) first, then
    the patches row by row. ``resize``: ``(model, S)`` prepares the model for inputs of side
    ``S`` (resamples a fixed position embedding; a no-op for models that interpolate it).
    """

    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    prefix: int
    patch_size: int
    resize: Callable[[nn.Module, int], None]


@dataclass
class Backbone:
    """A frozen encoder plus everything needed to feed it and to find its target layer.

    ``patch_tokens`` is set for ViTs (timm and Hugging Face ViT / DINOv2 / CLIP vision).
    """

    model: nn.Module
    modality: str
    embed_dim: int
    default_target: str
    input_config: ImageInput | TextInput | AudioInput
    embed_fn: Callable[[nn.Module, Any], torch.Tensor]
    model_id: str
    weights: str | None
    weights_sha256: str | None
    pooling: str | None = None
    tokenizer: Any = None
    patch_tokens: PatchTokens | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def embed(self, inputs: Any) -> torch.Tensor:
        """Pooled embeddings ``[n, embed_dim]`` of a model-ready batch."""
        return self.embed_fn(self.model, inputs)


def resolve_target_layer(model: nn.Module, path: str | None, default: str) -> tuple[str, nn.Linear]:
    """Return ``(path, layer)`` of the ``nn.Linear`` whose gradient becomes the feature.

    Raises ConfigError naming what was found when the path is missing or not Linear.
    """
    chosen = path or default
    modules = dict(model.named_modules())
    if chosen not in modules:
        close = [name for name in modules if name.endswith(chosen.split(".")[-1])][-5:]
        hint = f"; layers with a similar name: {', '.join(close)}" if close else ""
        raise ConfigError(f"target layer '{chosen}' not found in {type(model).__name__}{hint}")
    layer = modules[chosen]
    if not isinstance(layer, nn.Linear):
        raise ConfigError(
            f"target layer '{chosen}' is a {type(layer).__name__}, not an nn.Linear; "
            "FUNGI needs a linear layer (e.g. the attention output projection)"
        )
    return chosen, layer


def default_target_layer(model: nn.Module) -> str:
    """The attention output projection of the last transformer block."""
    best: tuple[int, str] | None = None
    for name, module in model.named_modules():
        match = _TARGET_PATTERN.search(name)
        if match and isinstance(module, nn.Linear):
            index = int(match.group(1))
            if best is None or index >= best[0]:
                best = (index, name)
    if best is None:
        raise ConfigError(
            f"cannot find an attention output projection in {type(model).__name__}; "
            "pass the target layer's dotted path explicitly"
        )
    return best[1]


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 23), b""):
            digest.update(block)
    return digest.hexdigest()


def _directory_sha256(directory: Path) -> str | None:
    files = sorted(p for p in directory.iterdir() if p.suffix in {".safetensors", ".bin", ".pth", ".pt"})
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        digest.update(file_sha256(file).encode())
    return digest.hexdigest()


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a local checkpoint without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ConfigError(f"weights file {path} is not a valid .safetensors file: {exc}") from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling refusal is a config problem
        raise ConfigError(f"cannot read weights {path} safely (weights_only=True): {exc}") from exc
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"weights file {path} does not hold a state dict")
    return state


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = sorted(set(own) - set(usable))
    if missing:
        raise ConfigError(
            f"weights {source} do not fit the model: {len(missing)} parameter(s) missing or "
            f"of another shape, e.g. {', '.join(missing[:5])}"
        )
    model.load_state_dict(usable, strict=True)


def _random_init(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "random-init"))
        return build()


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


@torch.no_grad()
def _probe_dim(backbone_model: nn.Module, embed_fn: Callable, sample: Any) -> int:
    return int(embed_fn(backbone_model, sample).shape[-1])


def load_backbone(
    model_id: str,
    modality: str,
    *,
    weights: str | None = None,
    seed: int = 0,
    pooling: str | None = None,
    trust_remote_code: bool = False,
) -> Backbone:
    """Load a frozen encoder on the CPU; see the module docstring for ids and weights."""
    if ":" not in model_id:
        raise ConfigError(f"model id '{model_id}' must start with 'timm:' or 'hf:'")
    family, name = model_id.split(":", 1)
    if family == "timm":
        if modality != "image":
            raise ConfigError(f"timm models are image encoders; got modality '{modality}'")
        backbone = _load_timm(name, weights, seed, pooling)
    elif family == "hf":
        backbone = _load_hf(name, modality, weights, seed, pooling, trust_remote_code)
    else:
        raise ConfigError(f"unknown model family '{family}' in '{model_id}'; use 'timm:' or 'hf:'")
    backbone.model_id = model_id
    return backbone


def _weights_hash(weights: str | None) -> str | None:
    if weights in (None, RANDOM_WEIGHTS):
        return None
    return file_sha256(weights)


CLIP_PROJECTION = "proj"


def _clip_projection_classes(name: str) -> int:
    """Width of a timm CLIP / EVA-CLIP image tower's image-text projection (its head).

    Only a tower as contrastively trained has one: a fine-tuned tag's head is a classifier.
    """
    from timm.models import get_pretrained_cfg

    architecture, _, tag = name.partition(".")
    cfg = get_pretrained_cfg(name) if tag else None
    if "_clip_" not in architecture or cfg is None or "ft_" in tag or not cfg.num_classes:
        raise ConfigError(
            f"--pooling {CLIP_PROJECTION} (the CLIP image embedding) needs a timm CLIP image tower "
            f"with its pretrained tag, e.g. vit_base_patch16_clip_224.openai; '{name}' has no projection head"
        )
    return int(cfg.num_classes)


def _load_timm(name: str, weights: str | None, seed: int, pooling: str | None = None) -> Backbone:
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"unknown timm model '{name}'")
    if pooling not in (None, CLIP_PROJECTION):
        raise ConfigError(f"timm models take no --pooling but '{CLIP_PROJECTION}' (CLIP image towers); got '{pooling}'")
    # heads are dropped (the pooled embedding), but a CLIP tower's projection is kept on request
    num_classes = _clip_projection_classes(name) if pooling == CLIP_PROJECTION else 0

    def build(pretrained: bool) -> nn.Module:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes)

    if weights == RANDOM_WEIGHTS:
        model = _random_init(lambda: build(False), seed)
    elif weights is None:
        try:
            model = build(True)
        except Exception as exc:  # noqa: BLE001 - hub and network failures vary
            raise ConfigError(
                f"cannot fetch pretrained weights for timm model '{name}' ({exc}); "
                "pass a local weights file"
            ) from exc
    else:
        model = build(False)
        _load_into(model, load_state_dict_file(weights), str(weights))
    model = _freeze(model)
    data = timm.data.resolve_model_data_config(model)
    input_config = ImageInput(
        input_size=int(data["input_size"][-1]),
        mean=tuple(float(v) for v in data["mean"]),
        std=tuple(float(v) for v in data["std"]),
        crop_pct=float(data.get("crop_pct") or 0.875),
    )

    def embed(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        return model(pixels)

    probe = torch.zeros(1, 3, input_config.input_size, input_config.input_size)
    return Backbone(
        model=model,
        modality="image",
        embed_dim=_probe_dim(model, embed, probe),
        default_target=default_target_layer(model),
        input_config=input_config,
        embed_fn=embed,
        model_id=f"timm:{name}",
        weights=weights,
        weights_sha256=_weights_hash(weights),
        pooling=pooling,
        patch_tokens=_timm_patch_tokens(model),
    )


def _timm_patch_tokens(model: nn.Module) -> PatchTokens | None:
    """Token access for timm ViTs (``forward_features`` keeps every token); None for other models."""
    patch_embed = getattr(model, "patch_embed", None)
    patch_size = getattr(patch_embed, "patch_size", None)
    if not (hasattr(model, "num_prefix_tokens") and hasattr(model, "set_input_size") and patch_size):
        return None
    if patch_size[0] != patch_size[1]:
        return None

    def forward(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        return model.forward_features(pixels)

    def resize(model: nn.Module, side: int) -> None:
        if tuple(model.patch_embed.img_size) != (side, side):
            model.set_input_size(img_size=(side, side))

    return PatchTokens(forward=forward, prefix=int(model.num_prefix_tokens), patch_size=int(patch_size[0]), resize=resize)


def _sentence_transformers_pooling(directory: Path) -> str | None:
    config = directory / "1_Pooling" / "config.json"
    if not config.is_file():
        return None
    settings = json.loads(config.read_text())
    if settings.get("pooling_mode_mean_tokens"):
        return "mean"
    if settings.get("pooling_mode_cls_token"):
        return "cls"
    return None


def _load_hf(
    name: str,
    modality: str,
    weights: str | None,
    seed: int,
    pooling: str | None,
    trust_remote_code: bool,
) -> Backbone:
    import transformers
    from transformers import AutoConfig, AutoModel

    if modality not in _MODALITY_INPUTS:
        raise ConfigError(f"unknown modality '{modality}'")
    _refuse_missing_directory(name)
    # a progress bar per load: noise in every worker's log and in the CLI's one-line errors
    transformers.utils.logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - missing dir, hub offline, bad json
        raise ConfigError(f"cannot load Hugging Face config for '{name}': {exc}") from exc
    if getattr(config, "model_type", "") == "clip":
        config = config.vision_config
    model_type = getattr(config, "model_type", "")
    model_cls = getattr(transformers, _HF_ENCODER_CLASSES[model_type]) if model_type in _HF_ENCODER_CLASSES else AutoModel
    try:  # the class AutoModel picks, to refuse a modality mismatch before any weight is read
        _refuse_modality_mismatch(name, modality, (AutoModel._model_mapping[type(config)] if model_cls is AutoModel
                                                   else model_cls).main_input_name)
    except KeyError:
        pass  # a class of remote code: checked on the loaded model below
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if model_type in {"vit", "bert", "roberta"}:
        kwargs["add_pooling_layer"] = False

    def from_config() -> nn.Module:
        if model_cls is AutoModel:
            return AutoModel.from_config(config, **kwargs)
        # what AutoModel.from_config calls on the class it picks; concrete classes have no from_config
        return model_cls._from_config(config)

    if weights == RANDOM_WEIGHTS:
        model = _random_init(from_config, seed)
    elif weights is None:
        try:
            # quiet: the loading report lists the unused pooler/classifier weights we drop on purpose
            verbosity = transformers.logging.get_verbosity()
            transformers.logging.set_verbosity_error()
            try:
                model = model_cls.from_pretrained(name, **kwargs)
            finally:
                transformers.logging.set_verbosity(verbosity)
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"cannot load Hugging Face model '{name}': {exc}") from exc
    else:
        model = from_config()
        _load_into(model, load_state_dict_file(weights), str(weights))
    model = _freeze(model)
    _refuse_modality_mismatch(name, modality, model.main_input_name)
    local_dir = Path(name) if Path(name).is_dir() else None
    weights_sha = _weights_hash(weights)
    if weights is None and local_dir is not None:
        weights_sha = _directory_sha256(local_dir)

    common = dict(
        model=model,
        modality=modality,
        model_id=f"hf:{name}",
        weights=weights,
        weights_sha256=weights_sha,
        default_target=default_target_layer(model),
    )
    if modality == "text":
        return _hf_text(name, config, pooling, local_dir, trust_remote_code, common)
    if modality == "image":
        return _hf_image(name, config, model_type, common)
    return _hf_audio(name, config, common)


# What each modality's embed function feeds a Hugging Face model: its ``main_input_name``.
_MODALITY_INPUTS = {"text": "input_ids", "image": "pixel_values", "audio": "input_values"}


def _refuse_missing_directory(name: str) -> None:
    """ConfigError when ``name`` is spelled as a path (absolute, ``./``, ``../``, ``~``) and is no directory.

    Hugging Face would take it for a hub id and answer with a message about repo id syntax.
    """
    if name.startswith(("/", "./", "../", "~")) or name in (".", ".."):
        path = Path(name).expanduser()
        if not path.is_dir():
            what = "is a file, not a model directory" if path.exists() else "does not exist"
            raise ConfigError(f"model directory '{name}' {what} (--model hf:<local directory or hub id>)")


def _refuse_modality_mismatch(name: str, modality: str, main_input: str) -> None:
    """ConfigError when the model takes another modality's input than ``modality`` (a text model given
    images, an audio model given text, ...): caught before any data is read, not as a traceback deep in
    its forward."""
    if main_input == _MODALITY_INPUTS[modality]:
        return
    model_modality = next((m for m, key in _MODALITY_INPUTS.items() if key == main_input), None)
    if model_modality is None:
        raise ConfigError(
            f"--model hf:{name} takes '{main_input}' inputs, which fungi's {modality} reader does not give "
            f"(it gives '{_MODALITY_INPUTS[modality]}'); use {_article(modality)} {modality} encoder"
        )
    raise ConfigError(
        f"--model hf:{name} is {_article(model_modality)} {model_modality} model, not {_article(modality)} "
        f"{modality} one: use --modality {model_modality}, or {_article(modality)} {modality} model with "
        f"--modality {modality}"
    )


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _hf_text(name, config, pooling, local_dir, trust_remote_code, common) -> Backbone:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"cannot load the tokenizer of '{name}': {exc}") from exc
    chosen = pooling or (local_dir and _sentence_transformers_pooling(local_dir)) or "cls"
    if chosen not in ("cls", "mean"):
        raise ConfigError(f"text pooling must be 'cls' or 'mean', got '{chosen}'")
    limits = [512, getattr(config, "max_position_embeddings", 512)]
    if 0 < getattr(tokenizer, "model_max_length", 0) < 10**6:
        limits.append(tokenizer.model_max_length)

    def embed(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = model(**batch).last_hidden_state
        if chosen == "cls":
            return hidden[:, 0]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    probe = tokenizer(["probe"], return_tensors="pt")
    return Backbone(
        **common,
        embed_dim=_probe_dim(common["model"], embed, dict(probe)),
        input_config=TextInput(max_length=min(limits)),
        embed_fn=embed,
        pooling=chosen,
        tokenizer=tokenizer,
    )


def _hf_image(name, config, model_type, common) -> Backbone:
    size = getattr(config, "image_size", 224)
    size = size if isinstance(size, int) else int(size[0])
    mean, std, crop_pct = IMAGENET_MEAN, IMAGENET_STD, 0.875
    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(name)
        mean = tuple(float(v) for v in processor.image_mean)
        std = tuple(float(v) for v in processor.image_std)
        crop = getattr(processor, "crop_size", None) or {}
        resize = getattr(processor, "size", None) or {}
        size = int(crop.get("height") or resize.get("height") or resize.get("shortest_edge") or size)
        shortest = resize.get("shortest_edge") or resize.get("height")
        if shortest and getattr(processor, "do_center_crop", False):
            crop_pct = size / float(shortest)
        else:
            crop_pct = 1.0
    except Exception:  # noqa: BLE001 - no processor shipped: ImageNet defaults
        pass
    use_pooler = model_type in _HF_POOLER_TYPES
    forward_kwargs = _mae_masking_off(common["model"]) if model_type == "vit_mae" else (lambda pixels: {})

    def embed(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        output = model(pixel_values=pixels, **forward_kwargs(pixels))
        if use_pooler and getattr(output, "pooler_output", None) is not None:
            return output.pooler_output
        return output.last_hidden_state[:, 0]

    input_config = ImageInput(input_size=size, mean=mean, std=std, crop_pct=crop_pct)
    probe = torch.zeros(1, 3, size, size)
    return Backbone(
        **common,
        embed_dim=_probe_dim(common["model"], embed, probe),
        input_config=input_config,
        embed_fn=embed,
        pooling="pooler" if use_pooler else "cls",
        patch_tokens=_hf_patch_tokens(config, model_type),
    )


def _mae_masking_off(model: nn.Module) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """Make a Hugging Face ViTMAE encoder see every patch, in order, as an encoder for features must.

    ViTMAEModel masks ``config.mask_ratio`` (0.75) of the patches in every forward, eval
    included, after shuffling them by fresh random noise. A ratio of 0 keeps all patches;
    the returned forward kwargs pass an increasing ``noise`` so that the shuffle is the
    identity (tokens stay in image order, no global random draw).
    """
    model.config.mask_ratio = 0.0  # the embeddings module reads this same config object

    def forward_kwargs(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        side = model.config.patch_size if isinstance(model.config.patch_size, int) else model.config.patch_size[0]
        patches = (pixels.shape[-2] // side) * (pixels.shape[-1] // side)
        noise = torch.arange(patches, device=pixels.device, dtype=torch.float32).expand(pixels.shape[0], patches)
        return {"noise": noise}

    return forward_kwargs


def _hf_patch_tokens(config: Any, model_type: str) -> PatchTokens | None:
    """Token access for Hugging Face ViT, DINOv2 (with registers) and CLIP vision; None for others.

    ``last_hidden_state`` is the final-norm output for ViT and DINOv2; CLIP's is the last
    block's output (its post-layernorm applies to the pooled token only).
    """
    if model_type not in ("vit", "dinov2", "dinov2_with_registers", "clip_vision_model"):
        return None
    patch = config.patch_size if isinstance(config.patch_size, int) else int(config.patch_size[0])
    # ViT and CLIP keep a fixed position embedding unless asked; DINOv2 always interpolates
    kwargs = {} if model_type.startswith("dinov2") else {"interpolate_pos_encoding": True}

    def forward(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=pixels, **kwargs).last_hidden_state

    return PatchTokens(
        forward=forward,
        prefix=1 + int(getattr(config, "num_register_tokens", 0) or 0),
        patch_size=patch,
        resize=lambda model, side: None,
    )


def _hf_audio(name, config, common) -> Backbone:
    settings = AudioInput(
        num_mel_bins=int(getattr(config, "num_mel_bins", 128)),
        max_frames=int(getattr(config, "max_length", 1024)),
        patch_frames=int(getattr(config, "patch_size", 16)),
    )
    try:
        from transformers import AutoFeatureExtractor

        extractor = AutoFeatureExtractor.from_pretrained(name)
        settings = AudioInput(
            sample_rate=int(extractor.sampling_rate),
            num_mel_bins=int(extractor.num_mel_bins),
            max_frames=int(extractor.max_length),
            mean=float(extractor.mean),
            std=float(extractor.std),
            patch_frames=settings.patch_frames,
        )
    except Exception:  # noqa: BLE001 - no extractor shipped: AST defaults
        pass

    def embed(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
        output = model(input_values=features)
        if getattr(output, "pooler_output", None) is not None:
            return output.pooler_output
        return output.last_hidden_state[:, 0]

    probe = torch.zeros(1, settings.max_frames, settings.num_mel_bins)
    return Backbone(
        **common,
        embed_dim=_probe_dim(common["model"], embed, probe),
        input_config=settings,
        embed_fn=embed,
        pooling="pooler",
    )
