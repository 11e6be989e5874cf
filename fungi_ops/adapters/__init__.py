"""Modality adapters: decode a raw payload into a compact canonical form, then build views.

Decoding runs once per row on CPU workers and yields something cheap to ship (a bounded
uint8 image, a cleaned string, a log-mel spectrogram). View building runs in the model's
process, on its device, from the canonical form: each row's views are drawn from the
stream ``(seed, "views", kind, content key)``, the key being the hash of the row's raw
payload (:func:`~fungi_ops.seeding.content_hash`), so a payload gets the same views in any
batch and under any id.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from fungi_ops.backbones import Backbone
from fungi_ops.errors import ConfigError, SampleError
from fungi_ops.objectives import ObjectiveConfig


# Default cap on an image's width x height before it is decoded. Decoding 100 Mpx holds the
# file's pixels (0.3 GB RGB, 0.4 GB RGBA) and one 8-bit RGB copy: measured peak +0.8 GB for a
# 100 Mpx RGBA PNG, within a CPU worker's share. It admits camera photos up to the ~100 Mpx
# sensors (bigger JPEGs are reduced while decoding) and sits between Pillow's own warning
# (89.5 Mpx) and refusal (179 Mpx) thresholds.
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000

_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def host_buffer(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed host tensor to fill and send to ``device``: page-locked (pinned) when that is
    a CUDA device, so that :func:`to_device` copies it by DMA without a staging copy."""
    return torch.zeros(tuple(shape), dtype=dtype, pin_memory=device.type == "cuda")


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; to CUDA from pinned memory, asynchronously.

    ``non_blocking`` from pageable memory is a synchronous copy through a staging buffer;
    from pinned memory the CPU goes on queueing work while the copy runs (the caching host
    allocator keeps the buffer until the copy is done). A tensor not pinned yet (the
    tokenizer's) is pinned first: for ids and masks a cheap copy.
    """
    if device.type != "cuda":
        return tensor.to(device)
    pinned = tensor if tensor.is_pinned() else tensor.pin_memory()
    return pinned.to(device, non_blocking=True)


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


def make_decoder(
    modality: str, input_config: Any, tokenizer: Any = None, *, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> ModalityAdapter:
    """An adapter from input settings alone: enough to decode on workers that hold no model.

    ``max_image_pixels`` bounds an image's width x height before decoding (see
    :class:`~fungi_ops.adapters.image.ImageAdapter`); other modalities ignore it.
    """
    if modality == "image":
        from fungi_ops.adapters.image import ImageAdapter

        return ImageAdapter(input_config, max_pixels=max_image_pixels)
    if modality == "text":
        from fungi_ops.adapters.text import TextAdapter

        return TextAdapter(tokenizer, input_config)
    if modality == "audio":
        from fungi_ops.adapters.audio import AudioAdapter

        return AudioAdapter(input_config)
    raise _unknown_modality(modality)


def _unknown_modality(modality: str) -> ConfigError:
    return ConfigError(f"modality must be image, text or audio, got '{modality}'")


def payload_bytes(payload: Any, modality: str, expected: str = "bytes") -> bytes:
    """The bytes of an encoded payload; SampleError naming the Python type of anything else, or if empty.

    Only bytes-like values are accepted: ``bytes(42)`` would allocate 42 zero bytes.
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise SampleError(f"{modality} payload must be {expected}, got {type(payload).__name__}")
    data = bytes(payload)
    if not data:
        raise SampleError(f"{modality} payload is empty (0 bytes)")
    return data


def describe_bytes(data: bytes) -> str:
    """How a decode error shows a payload: its size and first bytes, e.g. ``40 bytes, starting 89504e47...``."""
    return f"{len(data)} bytes, starting {data[:8].hex()}"


def error_text(exc: BaseException) -> str:
    """A decoder exception's message without object reprs (no memory addresses); its class name if empty."""
    return _OBJECT_REPR.sub("the payload", str(exc)).strip() or type(exc).__name__
