"""Text: decode to a cleaned string; views are the text itself and word-deletion variants.

All views of a batch are tokenised in one call of the model's own tokenizer. Padding is
masked out by the encoder, so a text's features do not depend on its neighbours.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from fungi_ops.adapters import ModalityAdapter, ViewGroup, to_device
from fungi_ops.backbones import TextInput
from fungi_ops.errors import ConfigError, SampleError
from fungi_ops.objectives import ObjectiveConfig, SimCLRConfig
from fungi_ops.seeding import generator


class TextAdapter(ModalityAdapter):
    """Text adapter: cleaned strings; views are the text and its word-deletion variants."""

    modality = "text"
    view_kinds = ("eval", "contrastive")

    def __init__(self, tokenizer: Any, settings: TextInput) -> None:
        self.tokenizer = tokenizer
        self.settings = settings

    def decode(self, payload: Any) -> str:
        """A string (or UTF-8 bytes) with whitespace collapsed; raises SampleError if empty or invalid."""
        if isinstance(payload, (bytes, bytearray, memoryview)):
            try:
                payload = bytes(payload).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise SampleError(f"text is not valid UTF-8: {exc}") from exc
        if not isinstance(payload, str):
            raise SampleError(f"text payload must be a string, got {type(payload).__name__}")
        text = " ".join(payload.split())
        if not text:
            raise SampleError("text is empty")
        return text

    def views_per_sample(self, kind: str, config: ObjectiveConfig | None) -> int:
        """1 eval view; ``text_views`` word-deletion views for SimCLR."""
        if kind == "eval":
            return 1
        if kind == "contrastive" and isinstance(config, SimCLRConfig):
            return config.text_views
        raise ConfigError(f"text has no '{kind}' views for {type(config).__name__}")

    def texts(self, text: str, key: str, group: ViewGroup, seed: int) -> list[str]:
        """The view strings of one text for one group."""
        if group.kind == "eval":
            return [text]
        config: SimCLRConfig = group.config  # type: ignore[assignment]
        words = text.split(" ")
        gen = generator(seed, "views", "contrastive", key)
        keep = torch.rand((group.count, len(words)), generator=gen) >= config.word_deletion
        # never delete every word: keep one chosen at random instead
        fallback = torch.randint(len(words), (group.count,), generator=gen)
        empty = ~keep.any(dim=1)
        keep[empty, fallback[empty]] = True
        return [" ".join(w for w, k in zip(words, row) if k) for row in keep.tolist()]

    def build_views(
        self,
        samples: Sequence[str],
        keys: Sequence[str],
        groups: Sequence[ViewGroup],
        seed: int,
        device: torch.device,
    ) -> dict[str, torch.Tensor]:
        """Tokenise every view of every sample in one call (group-major, then sample-major)."""
        texts = [
            view
            for group in groups
            for text, key in zip(samples, keys)
            for view in self.texts(text, key, group, seed)
        ]
        batch = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.settings.max_length,
            return_tensors="pt",
        )
        return {name: to_device(tensor, device) for name, tensor in batch.items()}
