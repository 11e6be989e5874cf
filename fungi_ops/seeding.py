"""Derive every random stream of a run from one seed plus names, never from global RNG state.

A row's views, the projection heads and the projection matrix are each drawn from a
``torch.Generator`` seeded by ``derive_seed(run_seed, *names)``. Because the derivation is
a cryptographic hash of the names, the same row gets the same views whatever batch, worker,
machine or order it lands in, and two different names never share a stream.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch

_SEED_MASK = (1 << 63) - 1


def derive_seed(run_seed: int, *names: object) -> int:
    """Return a 63-bit seed for the stream identified by ``names`` under ``run_seed``."""
    text = "\x1f".join([str(int(run_seed)), *(str(name) for name in names)])
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _SEED_MASK


def setup_order(run_seed: int, keys: Sequence[str]) -> list[int]:
    """Indices of ``keys`` in the order rows are drawn as setup data (SimCLR negatives).

    By a seeded hash of each key, so the draw depends on neither file layout nor row order:
    the first ``n`` of any superset that holds them are the same rows.
    """
    return sorted(range(len(keys)), key=lambda index: derive_seed(run_seed, "negatives", keys[index]))


def generator(run_seed: int, *names: object) -> torch.Generator:
    """A CPU generator for the named stream (CPU generators give the same bits on every machine)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(derive_seed(run_seed, *names))
    return gen
