"""``--batch-size``: a number of rows, or ``auto``; the defaults ``auto`` resolves to.

Torch-free, so that the job driver (which never imports torch) can size its stream with
the same numbers the actors use (:class:`fungi_ops.featurizer.BatchRunner`).
"""
from __future__ import annotations

from fungi_ops.errors import ConfigError

AUTO = "auto"
# On the CPU the forward already runs in chunks (fungi_ops.featurizer.CPU_FORWARD_ELEMENTS):
# bigger batches only hold more views in memory, so auto means the CLI's long-standing 16.
AUTO_CPU_BATCH = 16
# On CUDA, auto never exceeds this: a ViT-B with 62 views a row is compute-bound far below
# it, and the stream's blocks (pipelines.job.stream.block_rows) are sized for it.
AUTO_MAX_BATCH = 256
# Fraction of the actor's share of the free accelerator memory an auto batch may use; the
# rest covers the allocator's fragmentation and the next batch's inputs.
AUTO_MEMORY_FRACTION = 0.6


def parse_batch_size(value: int | str) -> int | str:
    """A positive int, or ``"auto"``; ConfigError naming ``--batch-size`` otherwise."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        rows = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--batch-size must be a positive integer or 'auto', not {value!r}") from None
    if rows < 1 or (isinstance(value, float) and value != rows):
        raise ConfigError(f"--batch-size must be a positive integer or 'auto', not {value!r}")
    return rows


def stream_batch_size(batch_size: int | str, accelerated: bool) -> int:
    """Rows the stream hands an actor per call: the batch size itself, or for ``auto`` the
    most an auto batch can hold on an accelerator (the actor cuts it to the size it picks)
    and the CPU default on CPUs."""
    if batch_size == AUTO:
        return AUTO_MAX_BATCH if accelerated else AUTO_CPU_BATCH
    return int(batch_size)
