"""Stage 2 of the stream, decoding (CPU tasks): payload -> the compact canonical form the actor featurizes.

Decoding (image bytes to pixels, text to its normalized string, audio to samples) runs in
CPU tasks so that the featurize actors only unpack (no copy) and feed the device. A row
that cannot be decoded keeps flowing with its error, the rest of its batch goes on.
"""
from __future__ import annotations

import pickle
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from fungi_ops.errors import SampleError

from pipelines.layout import CANON_COLUMN, ERROR_COLUMN, PAYLOAD_COLUMN, SHAPE_COLUMN, STAGE_COLUMN
from pipelines.ray_runtime import leave_if_torch_import_was_interrupted

CANON_DTYPES = {"image": np.uint8, "text": np.uint8, "audio": np.float32}


def pack(modality: str, canonical: Any) -> tuple[bytes, list[int]]:
    """Canonical form -> (bytes, shape), a compact Arrow-friendly encoding."""
    if modality == "text":
        array = np.frombuffer(canonical.encode("utf-8"), dtype=np.uint8)
    else:
        array = np.ascontiguousarray(canonical, dtype=CANON_DTYPES[modality])
    return array.tobytes(), list(array.shape)


def unpack(modality: str, data: bytes, shape: Sequence[int]) -> Any:
    """Inverse of :func:`pack`."""
    array = np.frombuffer(data, dtype=CANON_DTYPES[modality]).reshape(shape)
    if modality == "text":
        return array.tobytes().decode("utf-8")
    return array


def decode_batch(table: pa.Table, *, modality: str, decoder: bytes) -> pa.Table:
    """CPU stage: decode payloads into canonical form; undecodable rows carry their error.

    ``decoder`` is the spec's decoder (:func:`fungi_ops.factory.make_spec_decoder`),
    pickled: the driver never unpickles it.
    """
    leave_if_torch_import_was_interrupted()  # unpickling the decoder may import torch
    decode = pickle.loads(decoder).decode
    payloads = table.column(PAYLOAD_COLUMN).to_pylist()
    errors = table.column(ERROR_COLUMN).to_pylist()
    stages = table.column(STAGE_COLUMN).to_pylist()
    canon, shapes = [], []
    for index, payload in enumerate(payloads):
        data, shape = None, None
        if errors[index] is None:
            try:
                data, shape = pack(modality, decode(payload))
            except SampleError as exc:
                errors[index], stages[index] = str(exc), "decode"
            except Exception as exc:  # noqa: BLE001 - a decoder bug must not kill the job
                errors[index], stages[index] = f"unexpected {type(exc).__name__} while decoding: {exc}", "decode"
        canon.append(data)
        shapes.append(shape)
    table = table.drop_columns([PAYLOAD_COLUMN, ERROR_COLUMN, STAGE_COLUMN])
    return (
        table.append_column(CANON_COLUMN, pa.array(canon, pa.large_binary()))
        .append_column(SHAPE_COLUMN, pa.array(shapes, pa.list_(pa.int64())))
        .append_column(ERROR_COLUMN, pa.array(errors, pa.string()))
        .append_column(STAGE_COLUMN, pa.array(stages, pa.string()))
    )
