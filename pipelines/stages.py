"""The Ray Data stages of a featurization job: decode (CPU tasks), featurize (actor pool), write.

Rows travel between stages as Arrow tables. A row that fails anywhere keeps flowing with
its error message in ``ERROR_COLUMN`` and the stage in ``STAGE_COLUMN``, so it is
written to the ``_errors`` table instead of vanishing, and the rest of its batch goes on.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fungi_ops.errors import SampleError

from pipelines.storage import Location

log = logging.getLogger(__name__)

ID_COLUMN = "id"
HASH_COLUMN = "content_hash"
CANON_COLUMN = "__fungi_canon"
SHAPE_COLUMN = "__fungi_shape"
ERROR_COLUMN = "__fungi_error"
STAGE_COLUMN = "__fungi_stage"
SPEC_KEY = b"fungi.spec"
SPEC_HASH_KEY = b"fungi.spec_hash"
FAULT_INJECT_ENV = "FUNGI_FAULT_INJECT_ONCE"
CANON_DTYPES = {"image": np.uint8, "text": np.uint8, "audio": np.float32}


def content_hash(payload: Any) -> str:
    """Short hash of a payload's bytes: what ``--incremental`` compares across nights."""
    data = payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)
    return hashlib.blake2b(data, digest_size=12).hexdigest()


def pack(modality: str, canonical: Any) -> tuple[bytes, list[int]]:
    """Canonical form -> (bytes, shape), a compact Arrow-friendly encoding."""
    if modality == "text":
        array = np.frombuffer(canonical.encode("utf-8"), dtype=np.uint8)
    else:
        array = np.ascontiguousarray(canonical, dtype=CANON_DTYPES[modality])
    return array.tobytes(), list(array.shape)


def unpack(modality: str, data: bytes, shape: Sequence[int]) -> Any:
    array = np.frombuffer(data, dtype=CANON_DTYPES[modality]).reshape(shape)
    if modality == "text":
        return array.tobytes().decode("utf-8")
    return array


def decode_batch(
    table: pa.Table,
    *,
    modality: str,
    input_config: Any,
    id_column: str,
    data_column: str,
    keep_columns: Sequence[str],
    known_hashes: "dict[str, str] | ray.ObjectRef | None" = None,
) -> pa.Table:
    """CPU stage: validate and decode payloads; drop rows already featurized (incremental)."""
    import ray

    from fungi_ops.adapters import make_decoder

    if isinstance(known_hashes, ray.ObjectRef):
        known_hashes = ray.get(known_hashes)  # shared once through the object store
    decoder = make_decoder(modality, input_config)
    ids = table.column(id_column).to_pylist()
    payloads = table.column(data_column).to_pylist()
    keep_rows, out_ids, hashes, canon, shapes, errors = [], [], [], [], [], []
    for row, (row_id, payload) in enumerate(zip(ids, payloads)):
        key = "" if row_id is None else str(row_id)
        digest = None if payload is None else content_hash(payload)
        if known_hashes is not None and digest is not None and known_hashes.get(key) == digest:
            continue
        error = None
        data, shape = None, None
        if row_id is None:
            error = f"row has a null '{id_column}'"
        elif payload is None:
            error = f"'{data_column}' is null"
        else:
            try:
                data, shape = pack(modality, decoder.decode(payload))
            except SampleError as exc:
                error = str(exc)
            except Exception as exc:  # noqa: BLE001 - a decoder bug must not kill the job
                error = f"unexpected {type(exc).__name__} while decoding: {exc}"
        keep_rows.append(row)
        out_ids.append(key)
        hashes.append(digest or "")
        canon.append(data)
        shapes.append(shape)
        errors.append(error)
    kept = table.take(pa.array(keep_rows, type=pa.int64()))
    columns = {
        ID_COLUMN: pa.array(out_ids, pa.string()),
        HASH_COLUMN: pa.array(hashes, pa.string()),
        **{name: kept.column(name) for name in keep_columns},
        CANON_COLUMN: pa.array(canon, pa.large_binary()),
        SHAPE_COLUMN: pa.array(shapes, pa.list_(pa.int64())),
        ERROR_COLUMN: pa.array(errors, pa.string()),
        STAGE_COLUMN: pa.array(["decode" if e else None for e in errors], pa.string()),
    }
    return pa.table(columns)


def feature_array(values: np.ndarray, ok: np.ndarray, dim: int) -> pa.FixedSizeListArray:
    """``FixedSizeList<float32>[dim]`` with nulls where ``ok`` is False."""
    full = np.zeros((len(ok), dim), dtype=np.float32)
    full[ok] = values
    flat = pa.array(full.reshape(-1), type=pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(~ok))


class FeaturizeActor:
    """Actor-pool UDF: loads the frozen backbone once, then featurizes decoded batches.

    The resolved spec (JSON) and the setup state (SimCLR negatives) arrive through the
    object store, so every actor computes features for the same spec hash.
    """

    def __init__(self, spec_json: str, setup_state: dict | None, threads: int | None = None) -> None:
        import torch

        import ray

        from fungi_ops import Featurizer, FeaturizerSpec

        if isinstance(setup_state, ray.ObjectRef):
            setup_state = ray.get(setup_state)
        if threads:
            torch.set_num_threads(threads)
        spec = FeaturizerSpec.from_json(spec_json)
        self.featurizer = Featurizer(spec)
        if self.featurizer.spec.hash != spec.hash:
            raise RuntimeError(
                f"this worker resolves the spec to {self.featurizer.spec.hash}, the job to {spec.hash}: "
                "model files differ between nodes"
            )
        if setup_state:
            self.featurizer.load_setup_state(setup_state)
        self.modality = spec.modality
        self.dims = self.featurizer.feature_dims
        self._first_batch = True

    def _featurize_rows(self, samples: list, keys: list[str]) -> tuple[dict[str, np.ndarray], dict[int, str]]:
        """Featurize; if the batch as a whole raises, retry row by row to isolate the bad row."""
        try:
            batch = self.featurizer.featurize(samples, keys)
            return batch.features, {i: str(e) for i, e in batch.errors.items()}
        except Exception as exc:  # noqa: BLE001
            log.warning("batch of %d failed (%s); retrying row by row", len(samples), exc)
        features: dict[str, list[np.ndarray]] = {name: [] for name in self.dims}
        errors: dict[int, str] = {}
        for index, (sample, key) in enumerate(zip(samples, keys)):
            try:
                single = self.featurizer.featurize([sample], [key])
            except Exception as exc:  # noqa: BLE001
                errors[index] = f"{type(exc).__name__}: {exc}"
                continue
            if single.errors:
                errors[index] = str(single.errors[0])
                continue
            for name in self.dims:
                features[name].append(single.features[name])
        stacked = {
            name: np.concatenate(parts) if parts else np.zeros((0, self.dims[name]), np.float32)
            for name, parts in features.items()
        }
        return stacked, errors

    def __call__(self, table: pa.Table) -> pa.Table:
        if self._first_batch:
            self._first_batch = False
            _maybe_inject_fault()
        errors = table.column(ERROR_COLUMN).to_pylist()
        stages = table.column(STAGE_COLUMN).to_pylist()
        todo = [i for i, e in enumerate(errors) if e is None]
        ok = np.zeros(table.num_rows, dtype=bool)
        features = {name: np.zeros((0, dim), np.float32) for name, dim in self.dims.items()}
        if todo:
            canon = table.column(CANON_COLUMN).to_pylist()
            shapes = table.column(SHAPE_COLUMN).to_pylist()
            ids = table.column(ID_COLUMN).to_pylist()
            samples = [unpack(self.modality, canon[i], shapes[i]) for i in todo]
            features, failed = self._featurize_rows(samples, [ids[i] for i in todo])
            for position, index in enumerate(todo):
                if position in failed:
                    errors[index], stages[index] = failed[position], "featurize"
                else:
                    ok[index] = True
        table = table.drop_columns([CANON_COLUMN, SHAPE_COLUMN, ERROR_COLUMN, STAGE_COLUMN])
        for name, dim in self.dims.items():
            table = table.append_column(name, feature_array(features[name], ok, dim))
        table = table.append_column(ERROR_COLUMN, pa.array(errors, pa.string()))
        return table.append_column(STAGE_COLUMN, pa.array(stages, pa.string()))


def _maybe_inject_fault() -> None:
    """Testing hook, off unless ``FUNGI_FAULT_INJECT_ONCE=<marker file>`` is set for the workers.

    On an actor's first batch, if the marker file does not exist yet, create it and kill
    this worker process with ``os._exit(1)``, as a segfault or an OOM kill would. Ray then
    restarts the actor and retries the batch; the marker (created atomically, so one crash
    per marker even with several actors) makes the restarted actor carry on. The marker
    must be on a filesystem every node sees. Used by tests/test_cluster.py.
    """
    marker = os.environ.get(FAULT_INJECT_ENV)
    if not marker:
        return
    try:
        handle = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return
    os.write(handle, f"{os.getpid()}\n".encode())
    os.close(handle)
    log.warning("%s: injected crash of actor process %d", FAULT_INJECT_ENV, os.getpid())
    os._exit(1)


def _batch_name(ids: Sequence[str]) -> str:
    """Deterministic file name from the batch's ids: a retried task overwrites, never duplicates."""
    digest = hashlib.blake2b(digest_size=10)
    for row_id in ids:
        digest.update(row_id.encode("utf-8"))
        digest.update(b"\x00")
    return f"part-{digest.hexdigest()}.parquet"


def write_batch(
    table: pa.Table,
    *,
    staging: Location,
    spec_json: str,
    spec_hash: str,
) -> pa.Table:
    """Write a batch's good rows and its error rows to the staging area; return one stats row."""
    fs = staging.filesystem()
    name = _batch_name(table.column(ID_COLUMN).to_pylist())
    failed_mask = pc.is_valid(table.column(ERROR_COLUMN))
    good = table.filter(pc.invert(failed_mask)).drop_columns([ERROR_COLUMN, STAGE_COLUMN])
    bad = table.filter(failed_mask)
    metadata = {SPEC_KEY: spec_json.encode(), SPEC_HASH_KEY: spec_hash.encode()}
    stats = {"file": [None], "rows": [good.num_rows], "error_file": [None], "errors": [bad.num_rows]}
    if good.num_rows:
        path = staging.child_path(name)
        pq.write_table(good.replace_schema_metadata(metadata), path, filesystem=fs)
        stats["file"] = [path]
    if bad.num_rows:
        errors = pa.table(
            {
                ID_COLUMN: bad.column(ID_COLUMN),
                HASH_COLUMN: bad.column(HASH_COLUMN),
                "stage": bad.column(STAGE_COLUMN),
                "error": bad.column(ERROR_COLUMN),
            }
        ).replace_schema_metadata(metadata)
        path = staging.child_path("_errors", name)
        fs.create_dir(staging.child_path("_errors"), recursive=True)
        pq.write_table(errors, path, filesystem=fs)
        stats["error_file"] = [path]
    stats["written_at"] = [time.time()]  # wall clock of the node: the job derives its steady rate from these
    return pa.table(stats)
