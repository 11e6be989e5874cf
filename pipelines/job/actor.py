"""Stage 3 of the stream, featurizing: the actor pool that keeps the frozen backbone loaded.

:class:`FeaturizeActor` turns decoded rows into feature columns (global or dense), retrying a
failing batch row by row so that one bad row fails alone. ``FUNGI_FAULT_INJECT_ONCE`` is a
test hook that kills an actor once (:func:`_maybe_inject_fault`).
"""
from __future__ import annotations

import logging
import os

import numpy as np
import pyarrow as pa

from pipelines.job.decode import unpack
from pipelines.layout import (
    CANON_COLUMN, CONTENT_HASH_COLUMN, ERROR_COLUMN, ID_COLUMN, SHAPE_COLUMN, STAGE_COLUMN,
)
from pipelines.ray_runtime import leave_if_torch_import_was_interrupted

log = logging.getLogger(__name__)

FAULT_INJECT_ENV = "FUNGI_FAULT_INJECT_ONCE"


def feature_array(values: np.ndarray, ok: np.ndarray, dim: int) -> pa.FixedSizeListArray:
    """``FixedSizeList<float32>[dim]`` with nulls where ``ok`` is False."""
    full = np.zeros((len(ok), dim), dtype=np.float32)
    full[ok] = values
    flat = pa.array(full.reshape(-1), type=pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(~ok))


class FeaturizeActor:
    """Actor-pool UDF: loads the frozen backbone once, then featurizes decoded batches.

    The resolved spec (JSON) and the setup state (SimCLR negatives, or a dense spec's
    support index) arrive through the object store, so every actor computes features for
    the same spec hash. A dense spec runs :class:`~fungi_ops.dense.DenseFeaturizer` and
    gets the dense table's columns (:func:`fungi_ops.dense_table.dense_batch_columns`);
    batching, the row-by-row retry and the errors are the same for both.

    ``batch_size``: rows per featurize call, or ``"auto"``
    (:func:`fungi_ops.featurizer.auto_batch_size`, from the model and this actor's share
    of the GPU's memory, ``gpus``); a call that runs out of accelerator memory is redone
    in halves (:class:`fungi_ops.featurizer.BatchRunner`), not failed. Decoding happened
    in the stream's CPU tasks; the actor only unpacks (no copy) and sends pixels to the
    device from pinned memory.
    """

    def __init__(
        self,
        spec_json: str,
        setup_state: dict | None,
        threads: int | None = None,
        batch_size: int | str = "auto",
        gpus: float = 0.0,
    ) -> None:
        leave_if_torch_import_was_interrupted()
        import torch

        import ray

        from fungi_ops import FeaturizerSpec, make_featurizer
        from fungi_ops.featurizer import BatchRunner

        if threads:
            torch.set_num_threads(threads)
        spec = FeaturizerSpec.from_json(spec_json)
        self.featurizer = make_featurizer(spec)
        if self.featurizer.spec.hash != spec.hash:
            raise RuntimeError(
                f"this worker resolves the spec to {self.featurizer.spec.hash}, the job to {spec.hash}: "
                "model files differ between nodes"
            )
        if isinstance(setup_state, ray.ObjectRef):  # after the model load, which overlaps the setup encoding
            setup_state = ray.get(setup_state)
        if setup_state:
            self.featurizer.load_setup_state(setup_state)
        self.modality = spec.modality
        self.dense = spec.is_dense
        # one row's shape of each feature: [dim], or [patches, dim] for a dense spec
        patches = (self.featurizer.patches,) if self.dense else ()
        self.shapes = {name: (*patches, dim) for name, dim in self.featurizer.feature_dims.items()}
        self.run_batch = BatchRunner(self.featurizer, batch_size, memory_share=min(1.0, gpus) if gpus > 0 else 1.0)
        self._first_batch = True

    def _featurize_rows(self, samples: list, keys: list[str]) -> tuple[dict[str, np.ndarray], dict[int, str]]:
        """Featurize (in halves if out of memory); if the batch as a whole raises, retry row by row to isolate the bad row.

        ``keys``: the rows' content keys (``content_hash``), which seed their views.
        """
        try:
            batch = self.run_batch(samples, keys)
            return batch.features, {i: str(e) for i, e in batch.errors.items()}
        except Exception as exc:  # noqa: BLE001
            log.warning("batch of %d failed (%s); retrying row by row", len(samples), exc)
        features: dict[str, list[np.ndarray]] = {name: [] for name in self.shapes}
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
            for name in self.shapes:
                features[name].append(single.features[name])
        stacked = {
            name: np.concatenate(parts) if parts else np.zeros((0, *self.shapes[name]), np.float32)
            for name, parts in features.items()
        }
        return stacked, errors

    def _columns(self, features: dict[str, np.ndarray], ok: np.ndarray, ids: list[str]) -> dict[str, pa.Array]:
        """The feature columns of a batch, null where ``ok`` is False (the writer sends those rows to ``_errors``)."""
        if self.dense:
            from fungi_ops.dense import DenseBatch
            from fungi_ops.dense_table import dense_batch_columns

            # the nested lists wrap the feature arrays, no copy (a 512-px ViT-B image is 6 MiB)
            return dense_batch_columns(DenseBatch(ids, self.featurizer.grid, features), ok)
        return {name: feature_array(features[name], ok, shape[0]) for name, shape in self.shapes.items()}

    def __call__(self, table: pa.Table) -> pa.Table:
        """Features of the batch's decoded rows; rows that fail get their error, the rest go on."""
        if self._first_batch:
            self._first_batch = False
            _maybe_inject_fault()
        errors = table.column(ERROR_COLUMN).to_pylist()
        stages = table.column(STAGE_COLUMN).to_pylist()
        ids = table.column(ID_COLUMN).to_pylist()
        # a row's views are seeded by its content, never its id (fungi_ops.seeding)
        content_keys = table.column(CONTENT_HASH_COLUMN).to_pylist()
        todo = [i for i, e in enumerate(errors) if e is None]
        ok = np.zeros(table.num_rows, dtype=bool)
        features = {name: np.zeros((0, *shape), np.float32) for name, shape in self.shapes.items()}
        if todo:
            canon = table.column(CANON_COLUMN).to_pylist()
            shapes = table.column(SHAPE_COLUMN).to_pylist()
            samples = [unpack(self.modality, canon[i], shapes[i]) for i in todo]
            features, failed = self._featurize_rows(samples, [content_keys[i] for i in todo])
            for position, index in enumerate(todo):
                if position in failed:
                    errors[index], stages[index] = failed[position], "featurize"
                else:
                    ok[index] = True
        table = table.drop_columns([CANON_COLUMN, SHAPE_COLUMN, ERROR_COLUMN, STAGE_COLUMN])
        for name, column in self._columns(features, ok, ids).items():
            table = table.append_column(name, column)
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
