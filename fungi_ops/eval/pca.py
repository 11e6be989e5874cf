"""PCA fitted on the train split only, exact and memory-bounded.

The paper reduces every feature combination to the same dimension so that gains are
not an artefact of a larger representation. The projection is fitted on train rows
only; test rows are merely projected, so they can never influence it.

The fit accumulates the ``d x d`` covariance over row chunks (float32 matmuls summed in
float64) and takes its exact eigendecomposition. This needs ``O(d^2)`` memory instead of
a centred copy of the data, is deterministic (no randomised SVD), and works for
millions of rows on CPU or GPU.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from fungi_ops.eval.device import resolve_device, rows_to_device
from fungi_ops.eval.errors import EvalInputError, EvalWarning

DEFAULT_CHUNK_ROWS = 65536


@dataclass(frozen=True)
class PCAProjection:
    """A fitted PCA: ``transform(x) = (x - mean) @ components``.

    Attributes:
        mean: ``(d,)`` train mean.
        components: ``(d, dim)`` principal axes, by decreasing variance; each axis'
            sign is fixed so that its largest-magnitude coordinate is positive, which
            makes the projection reproducible across runs and devices.
        explained_variance: ``(dim,)`` variance of the train rows along each axis.
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray

    @property
    def dim(self) -> int:
        """Output dimension."""
        return int(self.components.shape[1])

    def transform(
        self,
        x: np.ndarray,
        *,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        device: str | torch.device | None = None,
    ) -> np.ndarray:
        """Project ``(n, d)`` rows to ``(n, dim)`` float32, one chunk of rows at a time."""
        dev = resolve_device(device)
        mean = torch.from_numpy(self.mean).to(dev)
        components = torch.from_numpy(self.components).to(dev)
        out = np.empty((x.shape[0], self.dim), dtype=np.float32)
        for start in range(0, x.shape[0], chunk_rows):
            chunk = rows_to_device(x[start : start + chunk_rows], dev)
            out[start : start + chunk_rows] = ((chunk - mean) @ components).cpu().numpy()
        return out


def fit_pca(
    x: np.ndarray,
    dim: int,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    device: str | torch.device | None = None,
) -> PCAProjection:
    """Fit a ``dim``-component PCA on the ``(n, d)`` train rows ``x``.

    ``dim`` larger than ``min(n, d)`` cannot be honoured (there are no more directions
    of variance); it is clamped with an :class:`EvalWarning` and the result's
    :attr:`PCAProjection.dim` tells the effective value.
    """
    if dim < 1:
        raise EvalInputError(f"PCA dimension must be positive, got {dim}")
    n, d = x.shape
    if dim > min(n, d):
        warnings.warn(
            f"PCA dimension {dim} exceeds min(train rows={n}, feature dim={d}); using {min(n, d)}",
            EvalWarning,
            stacklevel=2,
        )
        dim = min(n, d)
    dev = resolve_device(device)

    total = torch.zeros(d, dtype=torch.float64, device=dev)
    for start in range(0, n, chunk_rows):
        total += rows_to_device(x[start : start + chunk_rows], dev).sum(dim=0, dtype=torch.float64)
    mean = (total / n).to(torch.float32)

    covariance = torch.zeros((d, d), dtype=torch.float64, device=dev)
    for start in range(0, n, chunk_rows):
        centred = rows_to_device(x[start : start + chunk_rows], dev) - mean
        covariance += (centred.T @ centred).to(torch.float64)
    covariance /= max(n - 1, 1)

    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending order
    values = eigenvalues[-dim:].flip(0).clamp_min(0.0)
    axes = eigenvectors[:, -dim:].flip(1)
    pivots = axes.abs().argmax(dim=0)
    axes = axes * torch.sign(axes[pivots, torch.arange(dim, device=dev)])
    return PCAProjection(
        mean=mean.cpu().numpy(),
        components=axes.to(torch.float32).cpu().numpy(),
        explained_variance=values.cpu().numpy(),
    )
