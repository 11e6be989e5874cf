"""The batch job's featurize stage, for the items of requests.

A replica builds :class:`~pipelines.job.actor.FeaturizeActor` (the actor the job's pool runs)
from the spec and the setup state (SimCLR negatives) that the served output records, and
passes request items through the job's own steps: the content hash that seeds a row's views
(:func:`fungi_ops.seeding.content_hash`), :func:`~pipelines.job.decode.decode_batch` with the
spec's decoder (:func:`fungi_ops.factory.make_spec_decoder`), then the actor. A payload
therefore gets the features its copy in the output has: bit-identical when it is featurized
in a batch of the same rows as in the job (text rows are padded to the longest row of their
batch, which moves the last bits of a float32 result), equal within float rounding otherwise.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from fungi_ops.errors import ConfigError
from fungi_ops.seeding import content_hash
from pipelines.manifest import Manifest
from pipelines.job.actor import FeaturizeActor
from pipelines.job.decode import decode_batch
from pipelines.job.setup_rows import read_setup_state
from pipelines.job.spec_resolution import ResolvedSpec
from pipelines.layout import CONTENT_HASH_COLUMN, ERROR_COLUMN, ID_COLUMN, PAYLOAD_COLUMN, STAGE_COLUMN
from pipelines.storage import Location


@dataclass(frozen=True)
class ItemResult:
    """One item's features (feature column -> float32 vector), or its error and the stage that raised it."""

    id: str
    features: dict[str, np.ndarray] | None = None
    error: str | None = None
    stage: str | None = None


class ServingFeaturizer:
    """The featurize stage of the job that wrote ``manifest``, in this process.

    ``max_image_pixels``: the decoder's limit (``--max-image-pixels``); JPEGs above it are
    reduced while decoding, as the job does with the same limit, other images refused.
    ``threads``, ``batch_size``, ``gpus``: as the job's actor takes them.
    """

    def __init__(self, root: Location, manifest: Manifest, *, max_image_pixels: int, threads: int | None = None,
                 batch_size: int | str = "auto", gpus: float = 0.0) -> None:
        from fungi_ops.factory import make_spec_decoder

        spec = ResolvedSpec.recorded(manifest)
        if spec.dense:
            raise ConfigError(
                "fungi serve serves one vector per row; this output holds dense (per-patch) features: "
                "evaluate it with `fungi eval --task segmentation`"
            )
        setup_state = read_setup_state(root, manifest.setup_artifact) if manifest.setup_artifact else None
        self.spec_hash = spec.hash
        self.modality = spec.modality
        self.actor = FeaturizeActor(spec.json, setup_state, threads=threads, batch_size=batch_size, gpus=gpus)
        featurizer = self.actor.featurizer
        self.decoder = pickle.dumps(
            make_spec_decoder(featurizer.spec, featurizer.backbone.input_config, max_image_pixels=max_image_pixels)
        )

    @property
    def dims(self) -> dict[str, int]:
        """Feature column -> width."""
        return {name: shape[0] for name, shape in self.actor.shapes.items()}

    def featurize(self, ids: list[str], payloads: list[Any]) -> list[ItemResult]:
        """Features of ``payloads`` (text, or the encoded bytes of an image or audio file) in one batch,
        in order; an item that fails gets its error and stage, the others their features."""
        if not ids:
            return []
        hashes = [content_hash(payload) for payload in payloads]
        payload_type = pa.large_string() if self.modality == "text" else pa.large_binary()
        table = pa.table({
            ID_COLUMN: pa.array(ids, pa.string()),
            CONTENT_HASH_COLUMN: pa.array(hashes, pa.string()),
            PAYLOAD_COLUMN: pa.array(payloads, payload_type),
            ERROR_COLUMN: pa.nulls(len(ids), pa.string()),
            STAGE_COLUMN: pa.nulls(len(ids), pa.string()),
        })
        out = self.actor(decode_batch(table, modality=self.modality, decoder=self.decoder))
        errors = out.column(ERROR_COLUMN).to_pylist()
        stages = out.column(STAGE_COLUMN).to_pylist()
        columns = {name: _matrix(out.column(name), dim) for name, dim in self.dims.items()}
        return [
            ItemResult(item, error=errors[i], stage=stages[i]) if errors[i] is not None
            else ItemResult(item, features={name: matrix[i] for name, matrix in columns.items()})
            for i, item in enumerate(ids)
        ]


def _matrix(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """A fixed-size-list float32 column as ``(rows, dim)`` (a null row reads as zeros; its error says why)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    values = array.values.slice(array.offset * dim, len(array) * dim)  # null rows included, unlike flatten()
    return values.to_numpy(zero_copy_only=False).reshape(-1, dim)
