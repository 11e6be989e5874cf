"""Nearest neighbours among unit-norm vectors with faiss: dense FUNGI's support and the segmentation memory bank.

Vectors are L2-normalised, so the inner product is the cosine similarity. Index kinds:

* ``flat``: exact search (``IndexFlatIP``);
* ``ivf``: ``IVF<lists>,Flat``, an inverted file of :func:`ivf_lists` k-means cells of
  which ``probe`` are searched (approximate; the reference used ScaNN with 512 leaves,
  32 searched);
* ``ivf-sq8``: the same with 8-bit scalar-quantised vectors, a quarter of the memory
  (10^7 patches of 384 dims: 3.8 GB instead of 15 GB).

Exact search pays ``n_vectors x dim`` per query. Measured on this project's 2-core CPU, one
thread, for the 197 queries of one 224-px ViT image (recall: of the 2 nearest, against
exact search), 192 dims: flat 5 ms at 4,096 vectors, 17 ms at 8,192, 1,100 ms at 102,400;
at 102,400 vectors (1,024 lists, 32 probed) ``ivf`` 29 ms (recall 0.98), ``ivf-sq8`` 18 ms
(0.97); 384 dims: ``ivf`` 62 ms, ``ivf-sq8`` 36 ms (0.97). Scanning the probed lists reads
their vectors from memory for every query, so the 8-bit codes are faster as well as 4 times
smaller. ``auto`` (in :class:`~fungi_ops.objectives.DenseConfig` and the segmentation
memory bank) is therefore ``flat`` up to :data:`FLAT_LIMIT` vectors, ``ivf-sq8`` above.

Building is deterministic: the k-means training sample is a seeded draw of rows
(``seed``), k-means is seeded from it too, so the same vectors in the same order give the
same index. :meth:`NeighbourIndex.to_bytes` is
``faiss.serialize_index``, a ``uint8`` array that travels as a tensor in a setup artifact.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fungi_ops.seeding import derive_seed, generator

INDEX_KINDS: tuple[str, ...] = ("flat", "ivf", "ivf-sq8")
FLAT_LIMIT = 4096
"""Largest number of vectors searched exactly by ``auto`` (see the module docstring for the measurements)."""
AUTO_APPROXIMATE = "ivf-sq8"
"""The kind ``auto`` picks above :data:`FLAT_LIMIT` vectors."""


def auto_kind(size: int) -> str:
    """``flat`` up to :data:`FLAT_LIMIT` vectors, else :data:`AUTO_APPROXIMATE`."""
    return "flat" if size <= FLAT_LIMIT else AUTO_APPROXIMATE
TRAIN_POINTS_PER_LIST = 64
"""k-means training rows per inverted list (faiss warns below 39)."""


def ivf_lists(size: int) -> int:
    """Inverted lists for ``size`` vectors: the power of two nearest ``4 sqrt(size)``, at most ``size / 39``."""
    target = round(math.log2(max(1.0, 4.0 * math.sqrt(size))))
    cap = math.floor(math.log2(size / 39)) if size >= 39 else 0
    return 2 ** max(0, min(target, cap))


class NeighbourIndex:
    """A faiss index over unit-norm float32 vectors, searched by inner product.

    ``probe``: inverted lists searched by the IVF kinds (ignored by ``flat``).
    """

    def __init__(self, index, probe: int = 32) -> None:  # noqa: ANN001 - a faiss.Index
        import faiss

        self.index = index
        self.probe = int(probe)
        self._ivf = faiss.try_extract_index_ivf(index)
        if self._ivf is not None:
            self._ivf.nprobe = min(self.probe, self._ivf.nlist)

    @classmethod
    def build(cls, vectors: np.ndarray, kind: str, *, seed: int, probe: int = 32) -> "NeighbourIndex":
        """Index ``[n, dim]`` unit-norm ``vectors`` (row ``i`` is id ``i``) with ``kind`` (see :data:`INDEX_KINDS`)."""
        import faiss

        if kind not in INDEX_KINDS:
            raise ValueError(f"index kind must be one of {', '.join(INDEX_KINDS)}, got '{kind}'")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] == 0:
            raise ValueError(f"need a non-empty [n, dim] array of vectors, got shape {vectors.shape}")
        size, dim = vectors.shape
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        else:
            lists = ivf_lists(size)
            codec = "Flat" if kind == "ivf" else "SQ8"
            index = faiss.index_factory(dim, f"IVF{lists},{codec}", faiss.METRIC_INNER_PRODUCT)
            ivf = faiss.extract_index_ivf(index)
            ivf.cp.seed = derive_seed(seed, "ivf-kmeans") & 0x7FFFFFFF
            ivf.cp.max_points_per_centroid = TRAIN_POINTS_PER_LIST
            rows = min(size, TRAIN_POINTS_PER_LIST * lists)
            order = torch.randperm(size, generator=generator(seed, "ivf-train-rows"))[:rows].sort().values.numpy()
            index.train(vectors[order])
        index.add(vectors)
        return cls(index, probe)

    @property
    def size(self) -> int:
        """Number of indexed vectors."""
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        """Dimension of the vectors."""
        return int(self.index.d)

    @property
    def kind(self) -> str:
        """``flat``, ``ivf`` or ``ivf-sq8``."""
        if self._ivf is None:
            return "flat"
        return "ivf-sq8" if "ScalarQuantizer" in type(self.index).__name__ else "ivf"

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(similarities, indices)``, both ``[n_queries, k]``, best first; ``k <= size``.

        A query whose probed lists hold fewer than ``k`` vectors is searched again over
        every list, so no index is ever -1.
        """
        if not 1 <= k <= self.size:
            raise ValueError(f"k must be between 1 and the {self.size} indexed vectors, got {k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        similarities, indices = self.index.search(queries, k)
        short = np.flatnonzero((indices < 0).any(axis=1))
        if short.size and self._ivf is not None:
            self._ivf.nprobe = self._ivf.nlist
            try:
                similarities[short], indices[short] = self.index.search(queries[short], k)
            finally:
                self._ivf.nprobe = min(self.probe, self._ivf.nlist)
        return similarities, indices

    def to_bytes(self) -> np.ndarray:
        """The serialised index, a ``uint8`` array (store it, e.g. in a safetensors file)."""
        import faiss

        return faiss.serialize_index(self.index)

    @classmethod
    def from_bytes(cls, data: np.ndarray | bytes, probe: int = 32) -> "NeighbourIndex":
        """Inverse of :meth:`to_bytes` (the array is copied into faiss' own memory)."""
        import faiss

        array = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
        return cls(faiss.deserialize_index(np.ascontiguousarray(array, dtype=np.uint8)), probe)
