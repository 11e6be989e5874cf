"""Audio: decode wav/flac bytes to a log-mel (Kaldi fbank) spectrogram, then crop it in time.

Decoding uses ``soundfile`` (no FFmpeg needed), down-mixes to mono, resamples with
torchaudio and computes the fbank exactly as Hugging Face's AST feature extractor does,
once per row on CPU workers. Views are padded/cropped copies of that spectrogram built
for the whole batch with tensor indexing on the model's device.
"""
from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np
import torch

from fungi_ops.adapters import ModalityAdapter, ViewGroup, describe_bytes, error_text, payload_bytes, to_device
from fungi_ops.backbones import AudioInput
from fungi_ops.errors import ConfigError, SampleError
from fungi_ops.objectives import ObjectiveConfig, SimCLRConfig
from fungi_ops.seeding import generator

FRAME_SHIFT_MS = 10.0
FRAME_LENGTH_MS = 25.0


class AudioAdapter(ModalityAdapter):
    """Audio adapter: wav/flac bytes -> log-mel spectrogram; views are time crops of it."""

    modality = "audio"
    view_kinds = ("eval", "contrastive")

    def __init__(self, settings: AudioInput) -> None:
        self.settings = settings

    @property
    def min_seconds(self) -> float:
        """Shortest clip that fills one patch of the model in time."""
        frames = self.settings.patch_frames
        return ((frames - 1) * FRAME_SHIFT_MS + FRAME_LENGTH_MS) / 1000.0

    def decode(self, payload: Any) -> np.ndarray:
        """wav/flac bytes -> float32 fbank ``[frames, mel]`` (not yet normalised)."""
        import soundfile
        import torchaudio

        data = payload_bytes(payload, "audio", "bytes (an encoded audio file)")
        try:
            waveform, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
        except Exception as exc:  # noqa: BLE001 - libsndfile errors vary
            detail = exc.error_string if isinstance(exc, soundfile.LibsndfileError) else error_text(exc)
            raise SampleError(f"cannot decode audio ({describe_bytes(data)}): {detail}") from exc
        mono = torch.from_numpy(np.ascontiguousarray(waveform.mean(axis=1)))
        if not torch.isfinite(mono).all():
            raise SampleError("audio contains NaN or infinite samples")
        seconds = mono.numel() / float(rate)
        if seconds < self.min_seconds:
            raise SampleError(
                f"audio is {seconds:.3f} s long; the model needs at least {self.min_seconds:.3f} s"
            )
        if rate != self.settings.sample_rate:
            mono = torchaudio.functional.resample(mono, rate, self.settings.sample_rate)
        fbank = torchaudio.compliance.kaldi.fbank(
            mono.unsqueeze(0),
            htk_compat=True,
            sample_frequency=self.settings.sample_rate,
            use_energy=False,
            window_type="hanning",
            num_mel_bins=self.settings.num_mel_bins,
            dither=0.0,
            frame_shift=FRAME_SHIFT_MS,
        )
        return fbank[: self.settings.max_frames].numpy().astype(np.float32)

    def views_per_sample(self, kind: str, config: ObjectiveConfig | None) -> int:
        """1 eval view; ``audio_views`` time crops for SimCLR."""
        if kind == "eval":
            return 1
        if kind == "contrastive" and isinstance(config, SimCLRConfig):
            return config.audio_views
        raise ConfigError(f"audio has no '{kind}' views for {type(config).__name__}")

    def crops(self, frames: int, key: str, group: ViewGroup, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(start, length)`` of each view of a ``frames``-long spectrogram."""
        if group.kind == "eval":
            return torch.zeros(1, dtype=torch.long), torch.tensor([frames])
        config: SimCLRConfig = group.config  # type: ignore[assignment]
        gen = generator(seed, "views", "contrastive", key)
        low, high = config.audio_crop_scale
        fraction = low + (high - low) * torch.rand(group.count, generator=gen, dtype=torch.float64)
        lengths = torch.clamp(torch.round(fraction * frames).long(), min=min(frames, self.settings.patch_frames))
        starts = torch.floor(torch.rand(group.count, generator=gen, dtype=torch.float64) * (frames - lengths + 1)).long()
        return starts, lengths

    def build_views(
        self,
        samples: Sequence[np.ndarray],
        keys: Sequence[str],
        groups: Sequence[ViewGroup],
        seed: int,
        device: torch.device,
    ) -> torch.Tensor:
        """Normalised ``[views_total, max_frames, mel]`` spectrograms (AST input_values)."""
        max_frames = self.settings.max_frames
        padded = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(s) for s in samples], batch_first=True)
        padded = to_device(padded, device)
        frames = [int(s.shape[0]) for s in samples]
        sample_index, starts, lengths = [], [], []
        for group in groups:
            for index, (count, key) in enumerate(zip(frames, keys)):
                start, length = self.crops(count, key, group, seed)
                sample_index.append(torch.full_like(start, index))
                starts.append(start)
                lengths.append(length)
        sample_index_t = torch.cat(sample_index).to(device)
        starts_t = torch.cat(starts).to(device)
        lengths_t = torch.cat(lengths).to(device)
        positions = torch.arange(max_frames, device=device)
        source = (starts_t[:, None] + positions).clamp(max=padded.shape[1] - 1)  # [V, T]
        gathered = padded[sample_index_t[:, None], source]  # [V, T, mel]
        valid = (positions[None, :] < lengths_t[:, None]).unsqueeze(-1)
        views = torch.where(valid, gathered, torch.zeros((), device=device))
        return (views - self.settings.mean) / (self.settings.std * 2.0)
