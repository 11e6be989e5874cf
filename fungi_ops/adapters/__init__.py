"""Modality adapters: decode a raw payload into a compact canonical form, then build views.

Decoding runs once per row on CPU workers and yields something cheap to ship (a bounded
uint8 image, a cleaned string, a log-mel spectrogram). View building runs in the model's
process, on its device, from the canonical form: each row's views are drawn from the
stream ``(seed, "views", kind, row key)``, so a row gets the same views in any batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from fungi_ops.backbones import Backbone
from fungi_ops.objectives import ObjectiveConfig


@dataclass(frozen=True)
class ViewGroup:
    """A block of views per sample: the eval view, or the views one objective asks for."""

    kind: str
    count: int
    config: ObjectiveConfig | None = None


class ModalityAdapter:
    """Interface shared by the image, text and audio adapters."""

    modality: str = ""
    view_kinds: tuple[str, ...] = ("eval",)

    def decode(self, payload: Any) -> Any:
        """Raw cell value -> canonical form; raises :class:`~fungi_ops.errors.SampleError`."""
        raise NotImplementedError

    def views_per_sample(self, kind: str, config: ObjectiveConfig | None) -> int:
        """Number of views of ``kind`` one sample gets for the objective ``config``."""
        raise NotImplementedError

    def build_views(
        self,
        samples: Sequence[Any],
        keys: Sequence[str],
        groups: Sequence[ViewGroup],
        seed: int,
        device: torch.device,
    ) -> Any:
        """Model-ready inputs for all views: group-major, then sample-major, then view."""
        raise NotImplementedError


def make_adapter(backbone: Backbone) -> ModalityAdapter:
    """The adapter matching the backbone's modality and input settings."""
    return make_decoder(backbone.modality, backbone.input_config, backbone.tokenizer)


def make_decoder(modality: str, input_config: Any, tokenizer: Any = None) -> ModalityAdapter:
    """An adapter from input settings alone: enough to decode on workers that hold no model."""
    if modality == "image":
        from fungi_ops.adapters.image import ImageAdapter

        return ImageAdapter(input_config)
    if modality == "text":
        from fungi_ops.adapters.text import TextAdapter

        return TextAdapter(tokenizer, input_config)
    from fungi_ops.adapters.audio import AudioAdapter

    return AudioAdapter(input_config)
