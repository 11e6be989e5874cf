"""Seeded dense Rademacher projection of flattened gradients (Achlioptas 2001).

The matrix is defined row by row: row ``r`` is drawn from the stream
``(seed, "projection", r)``. Any chunking of the rows therefore yields the same matrix,
and every worker of every run with the same seed holds exactly the same projection.
Rows are generated on the CPU in ``int8`` chunks, cast to the compute dtype and copied
into one pre-allocated tensor on the target device, so the host never holds the whole
matrix, nor a float32 copy of it when a smaller dtype is asked for.

Dense on purpose: factored (Kronecker, two-stage) projections were measured to lose
2-20 k-NN points on real text (issue 2), so none is offered.
"""
from __future__ import annotations

import math

import torch

from fungi_ops.errors import ConfigError
from fungi_ops.seeding import generator

PROJECTION_KIND = "rademacher"


def projection_scale(in_dim: int) -> float:
    """Scaling 1/sqrt(d) that keeps projected norms comparable across layer sizes."""
    return 1.0 / math.sqrt(in_dim)


def generate_projection(
    out_dim: int,
    in_dim: int,
    seed: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    chunk_rows: int = 64,
) -> torch.Tensor:
    """Return the ``out_dim x in_dim`` matrix of +-1 entries for ``seed``.

    ``chunk_rows`` only bounds host memory (``chunk_rows * in_dim`` bytes at a time); it
    never changes the result.
    """
    if out_dim <= 0 or in_dim <= 0:
        raise ValueError(f"projection shape must be positive, got {out_dim} x {in_dim}")
    matrix = torch.empty((out_dim, in_dim), dtype=dtype, device=device)
    for start in range(0, out_dim, max(1, chunk_rows)):
        stop = min(out_dim, start + max(1, chunk_rows))
        bits = torch.empty((stop - start, in_dim), dtype=torch.int8)
        for offset, row in enumerate(range(start, stop)):
            bits[offset].random_(0, 2, generator=generator(seed, "projection", row))
        bits.mul_(2).sub_(1)
        matrix[start:stop].copy_(bits.to(dtype))
    return matrix


class RandomProjection(torch.nn.Module):
    """Holds the projection once per process, on the compute device and in the compute dtype."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("matrix", matrix, persistent=False)
        self.scale = projection_scale(matrix.shape[1])

    @classmethod
    def for_featurizer(
        cls,
        out_dim: int,
        in_dim: int,
        seed: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
        explicit: torch.Tensor | None = None,
    ) -> "RandomProjection":
        """The seeded projection of a featurizer, or an ``explicit`` matrix of the same shape
        (parity checks against other implementations); ConfigError for another shape."""
        if explicit is None:
            return cls(generate_projection(out_dim, in_dim, seed, dtype=dtype, device=device))
        if tuple(explicit.shape) != (out_dim, in_dim):
            raise ConfigError(f"projection must be {out_dim} x {in_dim}, got {tuple(explicit.shape)}")
        return cls(explicit.to(device, dtype))

    @property
    def out_dim(self) -> int:
        """Size of a projected gradient."""
        return self.matrix.shape[0]

    @property
    def in_dim(self) -> int:
        """Size of a flattened weight+bias gradient."""
        return self.matrix.shape[1]

    def forward(self, flat_gradients: torch.Tensor) -> torch.Tensor:
        """Project ``[n, in_dim]`` gradients to ``[n, out_dim]`` float32."""
        if flat_gradients.shape[-1] != self.in_dim:
            raise ValueError(
                f"gradient has {flat_gradients.shape[-1]} values, projection expects {self.in_dim}"
            )
        projected = flat_gradients.to(self.matrix.dtype) @ self.matrix.T
        return projected.float() * self.scale
