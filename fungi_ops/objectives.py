"""Self-supervised objectives whose gradients become features.

Each objective is a small config dataclass (its hyper-parameters, serialised into the
:class:`~fungi_ops.spec.FeaturizerSpec`) that builds an :class:`Objective` module: the
random heads, seeded from the run seed, and a *per-sample* loss on the backbone
embeddings of that sample's views. Losses are vectorised over samples and views and
never mix two samples, so a sample's gradient does not depend on its batch.

Adding an objective
-------------------
1. Write a frozen dataclass with its hyper-parameters and a ``name`` class variable,
   decorated with :func:`register_objective`.
2. Give it ``view_kind`` ("eval": the model's own single view, shared with the
   embedding; "multicrop": DINO crops; "contrastive": SimCLR views; the modality
   adapters build them) and ``build(...)``.
3. ``build`` returns an :class:`Objective` whose ``loss(embeddings)`` maps
   ``[batch, views, dim]`` embeddings to ``[batch]`` losses.
``notebooks/custom_objective.ipynb`` walks through one.

:class:`DenseConfig` (``dense``) is the one objective of another kind: its loss runs on a
ViT's patch tokens and its gradient is taken per patch, so :class:`~fungi_ops.dense.DenseFeaturizer`
computes it, alone, and :class:`~fungi_ops.featurizer.Featurizer` refuses it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fungi_ops.errors import ConfigError
from fungi_ops.neighbours import INDEX_KINDS, auto_kind
from fungi_ops.seeding import generator

if TYPE_CHECKING:
    from fungi_ops.backbones import Backbone

MODALITIES = ("image", "text", "audio")
OBJECTIVES: dict[str, type["ObjectiveConfig"]] = {}


def register_objective(config_cls: type["ObjectiveConfig"]) -> type["ObjectiveConfig"]:
    """Class decorator: make an objective config available by its ``name``."""
    if not config_cls.name:
        raise ConfigError(f"{config_cls.__name__} needs a non-empty 'name'")
    OBJECTIVES[config_cls.name] = config_cls
    return config_cls


def full_precision(tensor: torch.Tensor) -> torch.Tensor:
    """float64 stays float64 (the featurizer's loss dtype); lower precisions become float32."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def seeded_linear(in_dim: int, out_dim: int, seed: int, *names: object) -> nn.Linear:
    """An ``nn.Linear`` with PyTorch's default init drawn from a named seed stream."""
    layer = nn.Linear(in_dim, out_dim)
    gen = generator(seed, *names)
    bound = 1.0 / math.sqrt(in_dim)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=gen)
        layer.bias.uniform_(-bound, bound, generator=gen)
    layer.requires_grad_(False)
    return layer


class Objective(nn.Module):
    """A built objective: heads plus a per-sample loss on view embeddings."""

    config: "ObjectiveConfig"

    def __init__(self, config: "ObjectiveConfig") -> None:
        super().__init__()
        self.config = config

    @property
    def name(self) -> str:
        """The registered name of the objective's config (e.g. ``"kl"``)."""
        return self.config.name

    @property
    def needs_setup(self) -> bool:
        """True when supporting data (e.g. negatives) must be computed before featurizing."""
        return False

    def loss(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Map ``[batch, views, dim]`` backbone embeddings to ``[batch]`` losses."""
        raise NotImplementedError


@dataclass(frozen=True)
class ObjectiveConfig:
    """Base of objective configs; subclasses are frozen dataclasses."""

    name: ClassVar[str] = ""
    view_kind: ClassVar[str] = "eval"
    modalities: ClassVar[tuple[str, ...]] = MODALITIES

    def resolved(self, modality: str) -> "ObjectiveConfig":
        """Fill modality-dependent defaults and validate; raises ConfigError."""
        if modality not in self.modalities:
            raise ConfigError(
                f"objective '{self.name}' supports {', '.join(self.modalities)}, not {modality}"
            )
        return self

    def for_backbone(self, backbone: "Backbone") -> "ObjectiveConfig":
        """Fill what the loaded backbone determines and check that it fits; raises ConfigError.

        Called by :func:`~fungi_ops.featurizer.resolve_spec` after :meth:`resolved`; nothing
        to fill for objectives on pooled embeddings.
        """
        return self

    def build(self, embed_dim: int, modality: str, seed: int) -> Objective:
        """The :class:`Objective` for ``embed_dim``-wide embeddings, its heads seeded from ``seed``."""
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """Hyper-parameters as a plain dict, as serialised in the spec."""
        return dataclasses.asdict(self)


@register_objective
@dataclass(frozen=True)
class KLConfig(ObjectiveConfig):
    """KL divergence between a uniform distribution and the softmax of a random head.

    As in the reference code, ``F.kl_div(log_softmax(head(normalize(emb)) / T), uniform)``,
    i.e. KL(uniform || p). It uses the model's own eval view, the same forward pass that
    yields the embedding. T = 15 as in the paper's experiment jobs.
    """

    name: ClassVar[str] = "kl"
    view_kind: ClassVar[str] = "eval"
    temperature: float = 15.0
    latent_dim: int = 768

    def resolved(self, modality: str) -> "KLConfig":
        """Check the modality and that ``temperature`` and ``latent_dim`` are positive."""
        super().resolved(modality)
        _check_positive(self, "temperature", "latent_dim")
        return self

    def build(self, embed_dim: int, modality: str, seed: int) -> Objective:
        """A :class:`KLObjective` with a seeded ``embed_dim -> latent_dim`` head."""
        return KLObjective(self, embed_dim, seed)


class KLObjective(Objective):
    """KL(uniform || softmax(head(normalize(emb)) / T)) per sample; see :class:`KLConfig`."""

    def __init__(self, config: KLConfig, embed_dim: int, seed: int) -> None:
        super().__init__(config)
        self.head = seeded_linear(embed_dim, config.latent_dim, seed, "head", "kl")

    def loss(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``[batch, views, dim]`` embeddings -> ``[batch]`` losses, KL(u || p) summed over views.

        Per view this is the reference ``F.kl_div(log_softmax(logits), uniform)`` summed
        over the latent, ``sum_i u_i (log u_i - log p_i) = -log(L) - mean_i log p_i`` with
        ``u_i = 1/L``, ``L = latent_dim``, ``logits = head(normalize(emb)) / T``; in nats.
        """
        logits = self.head(F.normalize(embeddings, dim=-1)) / self.config.temperature
        log_probs = F.log_softmax(full_precision(logits), dim=-1)
        latent_dim = log_probs.shape[-1]
        # KL(u || p) = sum_i u_i (log u_i - log p_i), u_i = 1/L
        per_view = -(math.log(latent_dim) + log_probs.mean(dim=-1))
        return per_view.sum(dim=1)


@register_objective
@dataclass(frozen=True)
class DINOConfig(ObjectiveConfig):
    """DINO self-distillation between a student head and a frozen teacher head.

    Views: 2 global crops (area ``global_crops_scale``) and ``local_crops_number`` local
    crops (``local_crops_scale``), all at the model's input size. The teacher sees the
    global views; the loss sums the cross-entropy over every teacher x student view pair
    (same-view pairs included, as the reference does).
    """

    name: ClassVar[str] = "dino"
    view_kind: ClassVar[str] = "multicrop"
    modalities: ClassVar[tuple[str, ...]] = ("image",)
    teacher_temperature: float = 0.07
    student_temperature: float = 0.1
    latent_dim: int = 2048
    global_crops_scale: tuple[float, float] = (0.25, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.25)
    local_crops_number: int = 10

    def resolved(self, modality: str) -> "DINOConfig":
        """Validate temperatures, ``latent_dim`` and crop scales; crop scales become tuples."""
        super().resolved(modality)
        _check_positive(self, "teacher_temperature", "student_temperature", "latent_dim")
        for scale_name in ("global_crops_scale", "local_crops_scale"):
            low, high = getattr(self, scale_name)
            if not 0 < low <= high <= 1:
                raise ConfigError(f"dino.{scale_name} must satisfy 0 < low <= high <= 1, got {(low, high)}")
        if self.local_crops_number < 0:
            raise ConfigError("dino.local_crops_number must be >= 0")
        return dataclasses.replace(
            self,
            global_crops_scale=tuple(self.global_crops_scale),
            local_crops_scale=tuple(self.local_crops_scale),
        )

    def build(self, embed_dim: int, modality: str, seed: int) -> Objective:
        """A :class:`DINOObjective` with seeded student and teacher heads."""
        return DINOObjective(self, embed_dim, seed)


class DINOObjective(Objective):
    """DINO loss between a frozen teacher head on the global crops and a student head on all crops."""

    def __init__(self, config: DINOConfig, embed_dim: int, seed: int) -> None:
        super().__init__(config)
        self.head = seeded_linear(embed_dim, config.latent_dim, seed, "head", "dino", "student")
        self.teacher_head = seeded_linear(embed_dim, config.latent_dim, seed, "head", "dino", "teacher")

    def loss(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``[batch, views, dim]`` embeddings (the 2 global crops first) -> ``[batch]`` losses.

        Sum over teacher (global) views t and student views s of the cross-entropy
        ``-<p_t, log q_s>``, with ``p_t = softmax(teacher / T_t)`` (no gradient) and
        ``q_s = softmax(student / T_s)``.
        """
        normalized = F.normalize(embeddings, dim=-1)
        with torch.no_grad():
            teacher = full_precision(self.teacher_head(normalized[:, :2].detach()))
            teacher_probs = F.softmax(teacher / self.config.teacher_temperature, dim=-1)
        student = full_precision(self.head(normalized))
        student_log_probs = F.log_softmax(student / self.config.student_temperature, dim=-1)
        # sum over teacher views t and student views s of -<p_t, log q_s>
        return -(teacher_probs.sum(dim=1) * student_log_probs.sum(dim=1)).sum(dim=-1)


@register_objective
@dataclass(frozen=True)
class SimCLRConfig(ObjectiveConfig):
    """InfoNCE between a sample's views and a fixed batch of negatives.

    Views: overlapping patches for images (``num_patches``, ``stride_scale``: 4 and 6
    give 7x7 = 49 patches), random word deletion for text (``word_deletion``,
    ``text_views``), random time crops of the spectrogram for audio (``audio_views``,
    ``audio_crop_scale``). Negatives: the views of ``num_negatives`` samples of a
    training split, encoded once by :meth:`Featurizer.setup`.

    ``scale_denominator=False`` reproduces the reference implementation, where the
    temperature divides only the positive similarities and the log-sum-exp runs over
    raw cosine similarities; ``True`` gives textbook InfoNCE.
    """

    name: ClassVar[str] = "simclr"
    view_kind: ClassVar[str] = "contrastive"
    temperature: float = 0.07
    latent_dim: int | None = None
    num_negatives: int | None = None
    scale_denominator: bool = False
    num_patches: int = 4
    stride_scale: int = 6
    word_deletion: float = 0.1
    text_views: int = 12
    audio_views: int = 8
    audio_crop_scale: tuple[float, float] = (0.5, 0.9)
    default_latent_dim: ClassVar[dict[str, int]] = {"image": 96, "text": 256, "audio": 256}
    default_num_negatives: ClassVar[dict[str, int]] = {"image": 64, "text": 256, "audio": 64}

    def resolved(self, modality: str) -> "SimCLRConfig":
        """Validate the view settings and fill ``latent_dim``/``num_negatives`` per modality."""
        super().resolved(modality)
        _check_positive(self, "temperature")
        if math.isqrt(self.num_patches) ** 2 != self.num_patches:
            raise ConfigError(f"simclr.num_patches must be a perfect square, got {self.num_patches}")
        if self.stride_scale < 1:
            raise ConfigError("simclr.stride_scale must be >= 1")
        if not 0 <= self.word_deletion < 1:
            raise ConfigError("simclr.word_deletion must be in [0, 1)")
        low, high = self.audio_crop_scale
        if not 0 < low <= high <= 1:
            raise ConfigError(f"simclr.audio_crop_scale must satisfy 0 < low <= high <= 1, got {(low, high)}")
        if min(self.text_views, self.audio_views) < 2:
            raise ConfigError("simclr needs at least 2 text and audio views per sample")
        resolved = dataclasses.replace(
            self,
            latent_dim=self.latent_dim or self.default_latent_dim[modality],
            num_negatives=self.num_negatives or self.default_num_negatives[modality],
            audio_crop_scale=tuple(self.audio_crop_scale),
        )
        # 0 or unset picks the modality's default; a negative count would silently drop rows
        _check_positive(resolved, "latent_dim", "num_negatives")
        return resolved

    def build(self, embed_dim: int, modality: str, seed: int) -> Objective:
        """A :class:`SimCLRObjective` with a seeded head; its negatives come from setup."""
        return SimCLRObjective(self, embed_dim, seed)


class SimCLRObjective(Objective):
    """InfoNCE of each view against the sample's other views and fixed negatives; see :class:`SimCLRConfig`.

    ``self_similarity`` stands in for a view's similarity to itself in the log-sum-exp,
    removing it in effect.
    """

    self_similarity: float = -1e4

    def __init__(self, config: SimCLRConfig, embed_dim: int, seed: int) -> None:
        super().__init__(config)
        self.head = seeded_linear(embed_dim, config.latent_dim, seed, "head", "simclr")
        self.register_buffer("negatives", torch.empty(0, config.latent_dim), persistent=False)

    @property
    def needs_setup(self) -> bool:
        """Always True: the negatives must be set before :meth:`loss` runs."""
        return True

    def latents(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Head outputs, the space in which negatives are stored (un-normalised)."""
        return self.head(embeddings)

    def set_negatives(self, latents: torch.Tensor) -> None:
        """Store ``[n, latent_dim]`` head outputs (see :meth:`latents`) as float32 negatives."""
        if latents.ndim != 2 or latents.shape[1] != self.config.latent_dim:
            raise ConfigError(
                f"simclr negatives must be [n, {self.config.latent_dim}], got {tuple(latents.shape)}"
            )
        self.negatives = latents.to(self.head.weight.device, torch.float32)

    def loss(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``[batch, views, dim]`` embeddings -> ``[batch]`` InfoNCE losses, averaged over views.

        Per view, on cosine similarities of the normalised head outputs:
        ``-mean(positives) / T + logsumexp([negatives, other views])``, the positives
        being the sample's other views; the log-sum-exp terms are divided by ``T`` only
        when ``scale_denominator``. Raises ConfigError when no negatives are set.
        """
        if self.negatives.numel() == 0:
            raise ConfigError("simclr has no negatives: run Featurizer.setup() or load a setup artifact")
        z = F.normalize(full_precision(self.latents(embeddings)), dim=-1)  # [B, V, L]
        negatives = F.normalize(self.negatives.to(z.dtype), dim=-1)
        per_view = info_nce(
            z, negatives, self.config.temperature, scale_denominator=self.config.scale_denominator,
            self_similarity=self.self_similarity,
        )
        return per_view.mean(dim=1)


@register_objective
@dataclass(frozen=True)
class DenseConfig(ObjectiveConfig):
    """Per-patch FUNGI (the paper's in-context scene understanding, HummingBird).

    As ``fungi-hummingbird/eval_gradients.py`` of the reference: every token of the last
    block (class and register tokens too) goes through a seeded head (``latent_dim``); the
    tokens of an image are each other's positives, and the negatives are the head latents
    of the ``num_neighbors`` nearest support patches of each token, of which a seeded random
    ``negative_fraction`` is kept; InfoNCE as :class:`SimCLRConfig` with
    ``scale_denominator=False``. Each patch's feature is the gradient of that loss through
    its own token at the target layer (rank one), projected; class and register tokens get
    none.

    Why an objective and not a separate spec field: the spec, its hash, ``--objectives`` and
    the ``grad_<name>`` columns then cover it unchanged (``grad_dense``), and its settings sit
    beside the other objectives' hyper-parameters. It is computed alone (a spec with
    ``dense`` has no other objective), by :class:`~fungi_ops.dense.DenseFeaturizer`.

    Support: ``support_size`` L2-normalised raw patch tokens of a training split,
    ``support_patches_per_image`` seeded patches from each of the first images in
    :func:`~fungi_ops.seeding.setup_order` (the reference: 102,400 patches, about 10 per
    VOC train image), searched by inner product with ``index`` (``auto``: exact ``flat`` up
    to :data:`~fungi_ops.neighbours.FLAT_LIMIT` patches, else ``ivf-sq8``, 8-bit vectors:
    faster than ``ivf`` and a quarter of its memory, 3.8 GB for 10^7 patches of 384 dims),
    ``index_probe`` inverted lists searched.

    ``image_size``: side of the square view, the whole image resized as HummingBird's
    evaluation does (the reference: 512); default the model's input size.
    """

    name: ClassVar[str] = "dense"
    view_kind: ClassVar[str] = "dense"
    modalities: ClassVar[tuple[str, ...]] = ("image",)
    temperature: float = 0.07
    latent_dim: int = 96
    num_neighbors: int = 2
    negative_fraction: float = 0.5
    support_size: int = 102400
    support_patches_per_image: int = 10
    index: str = "auto"
    index_probe: int = 32
    image_size: int | None = None

    def resolved(self, modality: str) -> "DenseConfig":
        """Validate the settings and pick the index kind for ``support_size`` (``auto``)."""
        super().resolved(modality)
        _check_positive(
            self, "temperature", "latent_dim", "num_neighbors", "support_size", "support_patches_per_image", "index_probe"
        )
        if not 0 < self.negative_fraction <= 1:
            raise ConfigError(f"dense.negative_fraction must be in (0, 1], got {self.negative_fraction}")
        if self.index != "auto" and self.index not in INDEX_KINDS:
            raise ConfigError(f"dense.index must be auto or one of {', '.join(INDEX_KINDS)}, got '{self.index}'")
        if self.image_size is not None:
            _check_positive(self, "image_size")
        index = self.index if self.index != "auto" else auto_kind(self.support_size)
        return dataclasses.replace(self, index=index)

    def for_backbone(self, backbone: "Backbone") -> "DenseConfig":
        """Fill ``image_size`` from the model and check that it is a ViT whose patches tile it."""
        tokens = backbone.patch_tokens
        if tokens is None:
            raise ConfigError(
                f"dense features need a ViT's patch tokens; {backbone.model_id} ({type(backbone.model).__name__}) "
                "has none that fungi knows how to read"
            )
        size = self.image_size or backbone.input_config.input_size
        if size % tokens.patch_size:
            raise ConfigError(f"dense.image_size {size} is not a multiple of the patch size {tokens.patch_size}")
        return dataclasses.replace(self, image_size=size)

    @property
    def support_rows(self) -> int:
        """Images the support is drawn from: ``ceil(support_size / support_patches_per_image)``."""
        return -(-self.support_size // self.support_patches_per_image)

    def build(self, embed_dim: int, modality: str, seed: int) -> Objective:
        """A :class:`DenseObjective` with a seeded ``embed_dim -> latent_dim`` head."""
        return DenseObjective(self, embed_dim, seed)


class DenseObjective(Objective):
    """The per-image InfoNCE of :class:`DenseConfig` on token latents against support-patch latents."""

    def __init__(self, config: DenseConfig, embed_dim: int, seed: int) -> None:
        super().__init__(config)
        self.head = seeded_linear(embed_dim, config.latent_dim, seed, "head", "dense")

    @property
    def needs_setup(self) -> bool:
        """Always True: the support index must be built or loaded first."""
        return True

    def latents(self, tokens: torch.Tensor) -> torch.Tensor:
        """Head outputs of tokens (or of support patches), un-normalised."""
        return self.head(tokens)

    def loss(
        self, embeddings: torch.Tensor, negatives: torch.Tensor | None = None, negative_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[B, T, D]`` tokens -> ``[B]`` losses, InfoNCE averaged over the ``T`` tokens.

        ``negatives``: ``[B, M, L]`` latents of each image's support neighbours (from
        :meth:`latents`); ``negative_mask``: ``[B, M]`` bool, the ones kept.
        """
        if negatives is None or negative_mask is None:
            raise ConfigError("dense loss needs the support neighbours' latents: use DenseFeaturizer")
        z = F.normalize(full_precision(self.latents(embeddings)), dim=-1)
        negatives = F.normalize(negatives.to(z.dtype), dim=-1)
        return info_nce(z, negatives, self.config.temperature, negative_mask=negative_mask).mean(dim=1)


def info_nce(
    z: torch.Tensor,
    negatives: torch.Tensor,
    temperature: float,
    *,
    scale_denominator: bool = False,
    negative_mask: torch.Tensor | None = None,
    self_similarity: float = SimCLRObjective.self_similarity,
) -> torch.Tensor:
    """``[B, V]`` InfoNCE terms of every view of every sample, as the reference computes them.

    ``z``: ``[B, V, L]`` unit-norm view latents; the views of a sample are each other's
    positives. ``negatives``: unit-norm ``[M, L]`` (shared by all samples) or ``[B, M, L]``
    (one set per sample). ``negative_mask``: optional ``[B, M]`` bool, False drops a
    negative of that sample. Per view: ``-mean(cos to the other views) / T +
    logsumexp([cos to the kept negatives, cos to the other views])``; the log-sum-exp
    terms are divided by ``T`` only when ``scale_denominator``; a view's similarity to
    itself is replaced by ``self_similarity`` (removing it in effect).
    """
    views = z.shape[1]
    positive = z @ z.transpose(1, 2)  # [B, V, V]
    negative = z @ negatives.transpose(-1, -2)  # [B, V, M]
    if negative_mask is not None:
        negative = negative.masked_fill(~negative_mask[:, None, :], -math.inf)
    eye = torch.eye(views, dtype=torch.bool, device=z.device)
    mean_positive = positive.masked_fill(eye, 0.0).sum(dim=-1) / (views - 1)
    denominator = torch.cat([negative, positive.masked_fill(eye, self_similarity)], dim=-1)
    if scale_denominator:
        denominator = denominator / temperature
    return -mean_positive / temperature + torch.logsumexp(denominator, dim=-1)


def _check_positive(config: ObjectiveConfig, *names: str) -> None:
    for attr in names:
        if getattr(config, attr) <= 0:
            raise ConfigError(f"{config.name}.{attr} must be > 0, got {getattr(config, attr)}")


def make_objective_config(name: str, **params: Any) -> ObjectiveConfig:
    """Build a registered objective's config from its name and parameters."""
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective '{name}'; known: {', '.join(sorted(OBJECTIVES))}")
    config_cls = OBJECTIVES[name]
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(f"objective '{name}' has no parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    coerced = {key: tuple(value) if isinstance(value, list) else value for key, value in params.items()}
    return config_cls(**coerced)
