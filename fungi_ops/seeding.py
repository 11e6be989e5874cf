"""Derive every random stream of a run from one seed plus names, never from global RNG state.

A row's views, the projection heads and the projection matrix are each drawn from a
``torch.Generator`` seeded by ``derive_seed(run_seed, *names)``. Because the derivation is
a cryptographic hash of the names, the same row gets the same views whatever batch, worker,
machine or order it lands in, and two different names never share a stream.

A row's views are named by its content (:func:`content_hash` of its raw payload), never by
its id: two copies of one document under two ids get the same features, and a payload
featurized without any id (a query at serving time) gets those of its copy in the table.

Importing this module does not import torch (the job's driver hashes payloads without it).
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from fungi_ops.errors import SampleError

if TYPE_CHECKING:
    import torch

_SEED_MASK = (1 << 63) - 1


def derive_seed(run_seed: int, *names: object) -> int:
    """Return a 63-bit seed for the stream identified by ``names`` under ``run_seed``."""
    text = "\x1f".join([str(int(run_seed)), *(str(name) for name in names)])
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _SEED_MASK


def content_hash(payload: Any) -> str:
    """Short hash of a raw payload: the row's content key.

    It seeds the row's views (the key :meth:`~fungi_ops.featurizer.Featurizer.featurize`
    takes) and is what ``--incremental`` compares across nights. Text hashes as its UTF-8
    bytes (a string and its encoding are one payload); a uint8 array (an image given decoded)
    by its shape and values. Hashing the raw payload, not the decoded sample, costs the model's
    process nothing: the job computes it once, where it reads the row.
    """
    if isinstance(payload, str):
        data = payload.encode("utf-8")
    elif isinstance(payload, (bytes, bytearray, memoryview)):
        data = bytes(payload)
    elif isinstance(payload, np.ndarray):
        data = f"ndarray{payload.dtype.str}{payload.shape}".encode() + np.ascontiguousarray(payload).tobytes()
    else:
        raise SampleError(f"payload is a {type(payload).__name__}, not bytes or text")
    return hashlib.blake2b(data, digest_size=12).hexdigest()


def setup_order(run_seed: int, keys: Sequence[str]) -> list[int]:
    """Indices of ``keys`` in the order rows are drawn as setup data (SimCLR negatives).

    By a seeded hash of each key, so the draw depends on neither file layout nor row order:
    the first ``n`` of any superset that holds them are the same rows.
    """
    return sorted(range(len(keys)), key=lambda index: derive_seed(run_seed, "negatives", keys[index]))


def generator(run_seed: int, *names: object) -> "torch.Generator":
    """A CPU generator for the named stream (CPU generators give the same bits on every machine)."""
    import torch

    gen = torch.Generator(device="cpu")
    gen.manual_seed(derive_seed(run_seed, *names))
    return gen
