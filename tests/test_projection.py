"""The seeded Rademacher projection: values, determinism, chunking, dtype."""
from __future__ import annotations

import hashlib
import math

import pytest
import torch

from fungi_ops.projection import RandomProjection, generate_projection


def test_entries_are_plus_minus_one_and_balanced() -> None:
    matrix = generate_projection(32, 4096, seed=0)
    assert matrix.dtype == torch.float32
    assert set(torch.unique(matrix).tolist()) == {-1.0, 1.0}
    assert abs(float(matrix.mean())) < 0.02  # 131k fair coin flips


def test_same_seed_same_matrix_other_seed_differs() -> None:
    first = generate_projection(8, 1000, seed=7)
    assert torch.equal(first, generate_projection(8, 1000, seed=7))
    other = generate_projection(8, 1000, seed=8)
    assert (first != other).float().mean() > 0.4


def test_chunking_never_changes_the_matrix() -> None:
    one_row = generate_projection(37, 513, seed=3, chunk_rows=1)
    odd = generate_projection(37, 513, seed=3, chunk_rows=5)
    whole = generate_projection(37, 513, seed=3, chunk_rows=10_000)
    assert torch.equal(one_row, whole) and torch.equal(odd, whole)


def test_rows_do_not_depend_on_the_output_size() -> None:
    """Row r is its own stream, so a smaller projection is a prefix of a larger one."""
    assert torch.equal(generate_projection(5, 300, seed=1), generate_projection(9, 300, seed=1)[:5])


def test_matrix_is_pinned_across_machines_and_versions() -> None:
    """Golden bits for seed 42: a change here changes every feature ever written."""
    bits = (generate_projection(16, 777, seed=42) > 0).numpy().tobytes()
    assert hashlib.sha256(bits).hexdigest()[:16] == "f6933212a568a5e9"


def test_generated_directly_in_bf16() -> None:
    matrix = generate_projection(16, 2048, seed=0, dtype=torch.bfloat16, chunk_rows=4)
    assert matrix.dtype == torch.bfloat16
    assert matrix.element_size() == 2
    assert torch.equal(matrix.float(), generate_projection(16, 2048, seed=0))  # +-1 is exact in bf16


def test_rejects_empty_shapes() -> None:
    with pytest.raises(ValueError):
        generate_projection(0, 10, seed=0)


def test_random_projection_scales_by_inverse_sqrt_of_input_dim() -> None:
    matrix = generate_projection(6, 400, seed=2)
    projection = RandomProjection(matrix)
    gradients = torch.randn(3, 400, dtype=torch.float64)
    projected = projection(gradients)
    assert projected.dtype == torch.float32 and projected.shape == (3, 6)
    torch.testing.assert_close(projected, (gradients.float() @ matrix.T) / math.sqrt(400))
    with pytest.raises(ValueError, match="expects 400"):
        projection(torch.zeros(1, 399))
