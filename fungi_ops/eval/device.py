"""Torch device selection and host->device transfer of numpy row chunks.

The evaluation keeps full matrices in host memory as numpy arrays and streams row
chunks through torch, so that only chunk-sized tensors ever live on the accelerator.
"""
from __future__ import annotations

import numpy as np
import torch

from fungi_ops.eval.errors import EvalInputError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"`` picks CUDA when available, else CPU; anything else is passed to torch.

    Raises:
        EvalInputError: an unknown device name, or CUDA requested where it is unavailable
            (checked up front rather than failing midway through an evaluation).
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise EvalInputError(f"unknown torch device {device!r}: {exc}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EvalInputError(f"device {device!r} requested but CUDA is not available")
    return resolved


def rows_to_device(rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """A float32 tensor of ``rows`` on ``device``.

    Zero-copy on CPU when possible; read-only arrays (e.g. views of Arrow buffers) are
    copied because torch cannot wrap non-writable memory without warning.
    """
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    tensor = torch.from_numpy(rows) if rows.flags.writeable else torch.tensor(rows)
    return tensor.to(device)
