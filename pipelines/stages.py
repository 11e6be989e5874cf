"""The stages of a featurization job: read sources, decode, featurize, stage, finalize.

A **source** is one input file. Ray Data streams the sources to read through

1. :func:`read_sources` (one task per input file): streams the file's row groups, hashes
   each payload, and drops the rows whose id and content hash are those of a committed row:
   in the file's own previous output (and rows that failed before with the same content,
   unless ``--retry-failed``), or in a **donor**, the committed data file of another source
   that held its id (:mod:`pipelines.plan`: the files a rewrite, rename or compaction
   replaced). Rows found unchanged in a donor are listed as **carried**;
2. :func:`decode_batch` (CPU tasks): payload -> compact canonical form;
3. :class:`FeaturizeActor` (actor pool): canonical form -> features;
4. :func:`write_batch` (tasks): the rows of each block, grouped by source, into the
   run's staging area, with deterministic names (a retried task overwrites its file).

Then :func:`finalize_source` (one Ray task per touched source) merges a source's staged
rows with its previous output file and the rows it carries (read from the donors' committed
files, every column as committed: bit-identical features, never recomputed), dropping
replaced, failed, moved and pruned rows, into one new data file and one new error file in
staging, and returns the source's new
row of the sources table. Output files of sources nobody touched are never opened.

Rows travel as Arrow tables. A row that fails anywhere keeps flowing with its error
message in ``ERROR_COLUMN`` and the stage in ``STAGE_COLUMN``, so it is written to the
``_errors`` table instead of vanishing, and the rest of its batch goes on. A source
whose file cannot be read (a corrupt page) fails as a whole: nothing of it is committed
and its previous output stays as it was.

A dense spec (per-patch features, :mod:`fungi_ops.dense`) flows through the same stages;
the actor's featurizer and columns and the Parquet layout (``dense``) are all that differ.
Its rows are large (6 MiB of features a 512-px ViT-B image), so no stage copies the
feature columns it passes on (slices, not filters, unless rows failed), and finalize
streams a source's rows into its new file instead of holding them.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import posixpath
import re
import time
from datetime import datetime
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fungi_ops.errors import SampleError
from fungi_ops.seeding import content_hash

from pipelines.formats.base import as_lists
from pipelines.formats.input_tables import read_batches, read_columns
from pipelines.inputs import InputColumns, InputSchema
from pipelines.known_rows import KnownRows
from pipelines.manifest import ERRORS_DIR, INTERNAL_SUFFIX
from pipelines.plan import read_moved_ids
from pipelines.ray_runtime import leave_if_torch_import_was_interrupted
from pipelines.storage import InputFile, Location, fsync_file, write_whole

log = logging.getLogger(__name__)

ID_COLUMN = "id"
HASH_COLUMN = "content_hash"
TIME_COLUMN = "event_time"
TIME_TYPE = pa.timestamp("us", tz="UTC")
SOURCE_COLUMN = "__fungi_source"
PAYLOAD_COLUMN = "__fungi_payload"
CANON_COLUMN = "__fungi_canon"
SHAPE_COLUMN = "__fungi_shape"
ERROR_COLUMN = "__fungi_error"
STAGE_COLUMN = "__fungi_stage"
READ_STAGE = "read"
SPEC_KEY = b"fungi.spec"
SPEC_HASH_KEY = b"fungi.spec_hash"
FAULT_INJECT_ENV = "FUNGI_FAULT_INJECT_ONCE"
CANON_DTYPES = {"image": np.uint8, "text": np.uint8, "audio": np.float32}
ERROR_SCHEMA = pa.schema(
    [(ID_COLUMN, pa.string()), (HASH_COLUMN, pa.string()), ("stage", pa.string()), ("error", pa.string())]
)
BLOCKS_DIR = "blocks"
CARRIED_DIR = "carried"
FINAL_DIR = "final"
STAGED_SUFFIX = ".staged"  # a final file waiting in the staging area: no reader of the folder takes it for data


def source_tag(source: str) -> str:
    """8 hex digits naming a source in file names (its path may hold any character)."""
    return hashlib.blake2b(source.encode("utf-8"), digest_size=4).hexdigest()


def data_file_name(source: str, run_id: str | None = None) -> str:
    """Name of a source's data file: readable, unique, flat, and the same in every version.

    With ``run_id`` (a table format, whose data files are immutable: time travel reads the
    old ones) the run's id is part of the name, so a version never replaces a file.

    ``date=2026-12-01/part-0.parquet`` -> ``date=2026-12-01.part-0-1a2b3c4d.parquet``:
    every data file sits at the output root, so ``OUT/*.parquet`` is the whole table. A
    new version replaces the old one under the same name in one rename (one overwriting
    copy on S3), so a reader of the bare directory sees a source's old rows or its new
    ones, never both (:mod:`pipelines.formats.folder`).
    """
    stem = re.sub(r"[^A-Za-z0-9=_.-]+", "_", source.removesuffix(".parquet").replace("/", "."))[-80:].lstrip("._")
    version = f"-{run_id}" if run_id else ""
    return f"{stem or 'part'}-{source_tag(source)}{version}.parquet"


def run_of_data_file(data_name: str) -> str:
    """The run id a table's data file name carries (:func:`data_file_name` with ``run_id``)."""
    return posixpath.basename(data_name).removesuffix(".parquet").rsplit("-", 1)[-1]


def error_file_name(data_name: str) -> str:
    """Name of the error file (under ``_errors/``) beside the data file ``data_name``."""
    return posixpath.basename(data_name).removesuffix(".parquet") + INTERNAL_SUFFIX


def staged_final_path(staging: Location, name: str) -> str:
    """Where a run stages the new version of the committed file ``name`` until its commit moves it in."""
    return staging.child_path(FINAL_DIR, name + STAGED_SUFFIX)


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


# -- 1. read ---------------------------------------------------------------------------------


def carried_path(staging: Location, source: str) -> str:
    """Where the read task of ``source`` lists the rows it carries: ``(id, donor file)``."""
    return staging.child_path(CARRIED_DIR, f"{source_tag(source)}{INTERNAL_SUFFIX}")


def _read_block(
    table: pa.Table,
    *,
    source: str,
    first_row: int,
    columns: InputColumns,
    schema: InputSchema,
    event_time: datetime,
    known: KnownRows,
    retry_failed: bool,
    carried: list[tuple[pa.Array, pa.Array]],
) -> pa.Table:
    """Rows of one record batch to featurize (or to report), with the job's internal columns.

    A row whose id and content hash are those of a committed row is left out: unchanged in its
    own previous output, or appended to ``carried`` as ``(ids, donors)`` when another source's
    file holds it (the finalize task copies it from there). Only the hashing is per row in
    Python; the lookups are vectorized (:class:`~pipelines.known_rows.KnownRows`)."""
    keys = table.column(columns.id).combine_chunks().cast(pa.string())
    payloads = table.column(columns.data).combine_chunks()
    digests, errors = _content_hashes(payloads.to_pylist(), columns.data)
    times = table.column(columns.event_time).combine_chunks() if columns.event_time else None
    flagged = pc.or_(pc.is_null(keys), pc.is_null(payloads))
    if times is not None:
        flagged = pc.or_(flagged, pc.is_null(times))
    for row in np.flatnonzero(flagged.to_numpy(zero_copy_only=False)):
        if not keys[row].is_valid:
            errors[row] = f"row {first_row + row} of {source} has a null '{columns.id}'"
        elif not payloads[row].is_valid:
            errors[row] = f"'{columns.data}' is null"
        else:
            errors[row] = f"'{columns.event_time}' is null"
    digest_array = pa.array(digests, pa.string())
    old_digest, featurized, donor = known.lookup(keys)
    error_free = pa.array([e is None for e in errors], pa.bool_())
    same = pc.fill_null(pc.and_(pc.equal(old_digest, digest_array), error_free), False)  # null: not committed
    carry = pc.and_(same, pc.fill_null(pc.greater_equal(donor, 0), False))
    settled = pc.or_(pc.fill_null(featurized, False), pa.scalar(not retry_failed))  # featurized, or failed and not retried
    skip = pc.and_(pc.and_(same, pc.fill_null(pc.less(donor, 0), False)), settled)
    if _count(carry):
        carried.append((keys.filter(carry), donor.filter(carry)))
    keep = np.flatnonzero(~pc.or_(carry, skip).to_numpy(zero_copy_only=False))
    kept = table.take(pa.array(keep, pa.int64()))
    if columns.event_time:
        stamps = kept.column(columns.event_time).cast(schema.type_of(columns.event_time))
        if stamps.type.tz is None:
            stamps = pc.assume_timezone(stamps, "UTC")
        stamps = stamps.cast(TIME_TYPE)
    else:
        stamps = pa.array([event_time] * len(keep), TIME_TYPE)
    kept_errors = [errors[row] for row in keep]
    return pa.table(
        {
            ID_COLUMN: keys.take(pa.array(keep, pa.int64())),
            HASH_COLUMN: digest_array.take(pa.array(keep, pa.int64())),
            TIME_COLUMN: stamps,
            **{name: kept.column(name).cast(schema.type_of(name)) for name in columns.keep},
            PAYLOAD_COLUMN: kept.column(columns.data).cast(schema.type_of(columns.data)),
            SOURCE_COLUMN: pa.array([source] * len(keep), pa.string()),
            ERROR_COLUMN: pa.array(kept_errors, pa.string()),
            STAGE_COLUMN: pa.array(["decode" if e else None for e in kept_errors], pa.string()),
        }
    )


def _content_hashes(payloads: list[Any], data_column: str) -> tuple[list[str | None], list[str | None]]:
    """Each payload's content hash (None for a null payload) and, by row, why it could not be hashed."""
    errors: list[str | None] = [None] * len(payloads)
    try:
        return [None if payload is None else content_hash(payload) for payload in payloads], errors
    except Exception:  # noqa: BLE001 - a row, not the job: find which
        digests: list[str | None] = []
        for row, payload in enumerate(payloads):
            try:
                digests.append(None if payload is None else content_hash(payload))
            except Exception as exc:  # noqa: BLE001
                digests.append(None)
                errors[row] = f"cannot hash the '{data_column}' value: {exc}"
        return digests, errors


def _read_failure(source: str, message: str, columns: InputColumns, schema: InputSchema) -> pa.Table:
    """The one row that tells the commit a source could not be read."""
    return pa.table(
        {
            ID_COLUMN: pa.nulls(1, pa.string()),
            HASH_COLUMN: pa.nulls(1, pa.string()),
            TIME_COLUMN: pa.nulls(1, TIME_TYPE),
            **{name: pa.nulls(1, schema.type_of(name)) for name in columns.keep},
            PAYLOAD_COLUMN: pa.nulls(1, schema.type_of(columns.data)),
            SOURCE_COLUMN: pa.array([source]),
            ERROR_COLUMN: pa.array([message]),
            STAGE_COLUMN: pa.array([READ_STAGE]),
        }
    )


def read_sources(
    items: pa.Table,
    *,
    input_location: Location,
    output: Location,
    columns: InputColumns,
    schema: InputSchema,
    event_time: datetime,
    rows_per_block: int,
    retry_failed: bool,
    staging: Location,
) -> Iterator[pa.Table]:
    """Ray Data generator UDF over the sources to read (``source``, ``path``, the pickled
    :class:`~pipelines.storage.InputFile`, previous files, donor files): each source's live rows
    (:func:`~pipelines.formats.input_tables.read_batches`: a table's deletes applied) whose id
    or content is new. The rows it carries from donor files are listed at :func:`carried_path`
    once the file is read whole (a retried task writes the same list again).

    Memory: one record batch of ``rows_per_block`` rows, plus the (id, hash) pairs of
    the source's previous output and of its donor files (:class:`~pipelines.known_rows.KnownRows`).
    """
    fs = staging.filesystem()
    for item in items.to_pylist():
        source, donors = item["source"], item.get("donors") or []
        known = KnownRows.load(output, item["old_file"], item["old_error_file"], donors)
        carried: list[tuple[pa.Array, pa.Array]] = []
        first_row = 0
        try:
            input_file = pickle.loads(item["input"])
            for batch in read_batches(input_location, input_file, columns.names, rows_per_block):
                block = _read_block(
                    pa.Table.from_batches([batch]), source=source, first_row=first_row, columns=columns,
                    schema=schema, event_time=event_time, known=known, retry_failed=retry_failed, carried=carried,
                )
                first_row += batch.num_rows
                if block.num_rows:
                    yield block
            if donors:
                indices = pa.chunked_array([index for _, index in carried], pa.int32())
                listed = pa.table({ID_COLUMN: pa.chunked_array([ids for ids, _ in carried], pa.string()),
                                   "file": pa.array(donors, pa.string()).take(indices)})
                fs.create_dir(staging.child_path(CARRIED_DIR), recursive=True)
                write_whole(fs, carried_path(staging, source), lambda target: pq.write_table(listed, target, filesystem=fs))
        except Exception as exc:  # noqa: BLE001 - a corrupt file fails alone, the job goes on
            log.warning("cannot read input file %s: %s", item["path"], exc)
            yield _read_failure(
                source, f"cannot read input file {source} at row {first_row}: {type(exc).__name__}: {exc}", columns, schema
            )


# -- 2. decode -------------------------------------------------------------------------------


def decode_batch(table: pa.Table, *, modality: str, decoder: bytes) -> pa.Table:
    """CPU stage: decode payloads into canonical form; undecodable rows carry their error.

    ``decoder`` is the spec's decoder (:func:`fungi_ops.adapters.make_spec_decoder`),
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


# -- 3. featurize ----------------------------------------------------------------------------


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
        content_keys = table.column(HASH_COLUMN).to_pylist()
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


# -- 4. stage --------------------------------------------------------------------------------


def _block_name(source: str, ids: Sequence[str | None]) -> str:
    """Deterministic file name from a block's source and ids: a retried task overwrites, never duplicates."""
    digest = hashlib.blake2b(source.encode("utf-8"), digest_size=10)
    for row_id in ids:
        digest.update(b"\x01" if row_id is None else row_id.encode("utf-8"))
        digest.update(b"\x00")
    return f"{source_tag(source)}-{digest.hexdigest()}{INTERNAL_SUFFIX}"


def spec_metadata(spec_json: str, spec_hash: str) -> dict[bytes, bytes]:
    """The schema metadata every feature file carries."""
    return {SPEC_KEY: spec_json.encode(), SPEC_HASH_KEY: spec_hash.encode()}


def _rows_where(table: pa.Table, mask: pa.Array | pa.ChunkedArray) -> pa.Table:
    """The rows where ``mask`` is true: a zero-copy slice when they are consecutive, else a filtered copy.

    ``Table.filter`` copies every column, and a dense block's nested feature lists are most of
    its bytes (6 MiB a 512-px ViT-B image); a block's rows of one source are consecutive, and
    so are all of them when no row failed.
    """
    chosen = np.flatnonzero(pc.fill_null(mask, False).to_numpy(zero_copy_only=False))
    if len(chosen) == 0 or chosen[-1] - chosen[0] + 1 == len(chosen):
        return table.slice(int(chosen[0]) if len(chosen) else 0, len(chosen))
    return table.filter(mask)


def write_rows(table: pa.Table, path: str, fs: Any, *, dense: bool) -> None:
    """Write feature rows as one Parquet file: a dense table as :func:`fungi_ops.dense_table.write_dense_parquet`."""
    if dense:
        from fungi_ops.dense_table import write_dense_parquet

        write_dense_parquet(table, path, filesystem=fs)
    else:
        pq.write_table(table, path, filesystem=fs)


def write_batch(table: pa.Table, *, staging: Location, spec_json: str, spec_hash: str, dense: bool = False) -> pa.Table:
    """Write a block's good rows and error rows, per source, to staging; one stats row per source.

    Each file appears whole or not at all (:func:`pipelines.storage.write_whole`): a task
    killed mid-write (a lost node) leaves no truncated block for ``--history`` to keep.

    ``dense``: the rows hold a dense spec's per-patch features (see :func:`write_rows`).
    """
    fs = staging.filesystem()
    metadata = spec_metadata(spec_json, spec_hash)
    stats: dict[str, list] = {"source": [], "file": [], "rows": [], "error_file": [], "errors": [], "written_at": []}
    for source in pc.unique(table.column(SOURCE_COLUMN)).to_pylist():
        part = _rows_where(table, pc.equal(table.column(SOURCE_COLUMN), source)).drop_columns([SOURCE_COLUMN])
        name = _block_name(source, part.column(ID_COLUMN).to_pylist())
        failed = pc.is_valid(part.column(ERROR_COLUMN))
        good = _rows_where(part, pc.invert(failed)).drop_columns([ERROR_COLUMN, STAGE_COLUMN])
        bad = part.select([ID_COLUMN, HASH_COLUMN, STAGE_COLUMN, ERROR_COLUMN]).filter(failed)  # no feature copied
        row = {"source": source, "file": None, "rows": good.num_rows, "error_file": None, "errors": bad.num_rows}
        if good.num_rows:
            fs.create_dir(staging.child_path(BLOCKS_DIR), recursive=True)
            row["file"] = staging.child_path(BLOCKS_DIR, name)
            rows = good.replace_schema_metadata(metadata)
            write_whole(fs, row["file"], lambda target: write_rows(rows, target, fs, dense=dense))
        if bad.num_rows:
            row["error_file"] = staging.child_path(BLOCKS_DIR, ERRORS_DIR, name)
            errors = pa.table(
                [bad.column(ID_COLUMN), bad.column(HASH_COLUMN), bad.column(STAGE_COLUMN), bad.column(ERROR_COLUMN)],
                schema=ERROR_SCHEMA,
            )
            fs.create_dir(staging.child_path(BLOCKS_DIR, ERRORS_DIR), recursive=True)
            errors = errors.replace_schema_metadata(metadata)
            write_whole(fs, row["error_file"], lambda target: pq.write_table(errors, target, filesystem=fs))
        row["written_at"] = time.time()  # wall clock of the node: the job derives its steady rate from these
        for key, value in row.items():
            stats[key].append(value)
    return pa.table(stats, schema=pa.schema([
        ("source", pa.string()), ("file", pa.string()), ("rows", pa.int64()),
        ("error_file", pa.string()), ("errors", pa.int64()), ("written_at", pa.float64()),
    ]))


# -- 5. finalize -----------------------------------------------------------------------------


FINAL_BUFFER_BYTES = 256 << 20
"""Rows a finalize task gathers before writing them as a row group (dense tables: row groups of
``fungi_ops.dense_table.ROW_GROUP_BYTES``), so that its memory does not grow with the source."""


def _read_many(fs: Any, paths: Sequence[str], schema: pa.Schema | None = None) -> pa.Table | None:
    tables = [pq.read_table(path, filesystem=fs) for path in paths]
    if not tables:
        return None
    return pa.concat_tables(tables) if schema is None else pa.concat_tables([t.cast(schema) for t in tables])


def _first_rows(table: pa.Table) -> np.ndarray:
    """Bool mask of the first row of each id: a block written twice by a retried task counts once."""
    first = np.ones(table.num_rows, dtype=bool)
    if table.num_rows < 2 or pc.count_distinct(table.column(ID_COLUMN)).as_py() == table.num_rows:
        return first
    indexed = table.select([ID_COLUMN]).append_column("__row", pa.array(np.arange(table.num_rows)))
    first[:] = False
    first[indexed.group_by(ID_COLUMN).aggregate([("__row", "min")]).column("__row_min").to_numpy()] = True
    return first


def _first_per_id(table: pa.Table) -> pa.Table:
    """One row per id (the first), see :func:`_first_rows`."""
    return table.filter(pa.array(_first_rows(table)))


class _FinalFile:
    """A source's new data file, written part by part: memory holds one part and the rows gathered.

    A source's rows (its previous file, read a row group at a time, and its staged blocks)
    never sit in memory all at once: a dense source of 10,000 images at 512 px holds 60 GB
    of ViT-B features. Global features gather up to :data:`FINAL_BUFFER_BYTES` per row
    group, dense ones are written as :func:`~fungi_ops.dense_table.write_dense_parquet` does.
    """

    def __init__(self, fs: Any, path: str, metadata: dict[bytes, bytes], dense: bool, list_vectors: bool = False) -> None:
        self.fs, self.path, self.metadata, self.dense, self.list_vectors = fs, path, metadata, dense, list_vectors
        self.flush_bytes = FINAL_BUFFER_BYTES
        if dense:
            from fungi_ops.dense_table import ROW_GROUP_BYTES

            self.flush_bytes = ROW_GROUP_BYTES
        self.parts: list[pa.Table] = []
        self.buffered = 0
        self.writer: pq.ParquetWriter | None = None

    def write_file(self, path: str, keep: np.ndarray | None = None) -> None:
        """Append the rows of a Parquet file where ``keep`` (a bool per row; None: all) holds, row group by row group."""
        with self.fs.open_input_file(path) as handle:
            parquet, start = pq.ParquetFile(handle), 0
            for group in range(parquet.num_row_groups):
                rows = parquet.metadata.row_group(group).num_rows
                chosen = None if keep is None else keep[start : start + rows]
                start += rows
                if chosen is not None and not chosen.any():
                    continue
                table = parquet.read_row_group(group)
                self.write(table if chosen is None else _rows_where(table, pa.array(chosen)))

    def write(self, table: pa.Table) -> None:
        """Append rows; they are written once :data:`FINAL_BUFFER_BYTES` (dense: a row group's worth) are gathered."""
        if table.num_rows:
            if self.list_vectors:
                table = as_lists(table)
            self.parts.append(table.replace_schema_metadata(self.metadata))
            self.buffered += table.nbytes
            if self.buffered >= self.flush_bytes:
                self._flush()

    def _flush(self) -> None:
        if not self.parts:
            return
        group = pa.concat_tables(self.parts)
        self.parts, self.buffered = [], 0
        row_group_size = None
        if self.dense:
            from fungi_ops.dense_table import dense_parquet_options, dense_row_group_rows

            row_group_size = dense_row_group_rows(group)
        if self.writer is None:
            options = dense_parquet_options(group.schema) if self.dense else {}
            self.writer = pq.ParquetWriter(self.path, group.schema, filesystem=self.fs, **options)
        self.writer.write_table(group, row_group_size=row_group_size)

    def close(self) -> None:
        """Write what is gathered, close the file and make it durable."""
        self._flush()
        if self.writer is not None:
            self.writer.close()
            fsync_file(self.fs, self.path)


def _ids_in(table: pa.Table | None, values: pa.Array) -> pa.Array:
    return pc.is_in(table.column(ID_COLUMN), value_set=values) if table is not None else pa.array([], pa.bool_())


def _count(mask: pa.Array) -> int:
    return int(pc.sum(mask).as_py() or 0) if len(mask) else 0


FINALIZE_COUNTS = ("written", "carried", "replaced", "failed_new", "failed_known", "removed_failed", "deleted", "moved", "rewritten")


def finalize_source(
    work: dict[str, Any],
    *,
    input_location: Location,
    output: Location,
    staging: Location,
    id_column: str,
    id_type: pa.DataType,
    run_id: str,
    prune: bool,
    metadata: dict[bytes, bytes],
    dense: bool = False,
    data_name: str | None = None,
    list_vectors: bool = False,
) -> dict[str, Any]:
    """Ray task: a source's new data and error file (in staging) and its new sources-table row.

    ``work`` holds the source, its kind, its previous row (``old``), its input file if
    listed, its staged block files and the ids that moved to other files. Returns
    ``{"row": ..., "counts": {...}, "failed": message or None, "opened": names}``; a source
    that could not be read keeps its previous row (a new one: :func:`unreadable_source_row`). ``data_name`` is the name of its new data
    file (the output format's: :func:`data_file_name` with the run id for tables); ``list_vectors``: its
    vectors as ``list<float>`` (a table format's). The decisions take the ids alone
    (:class:`_SourceFinalizer`); the data file is then streamed (:class:`_FinalFile`;
    ``dense``: a dense table's layout).
    """
    step = _SourceFinalizer(work, output=output, prune=prune)
    failure = step.read_staged()
    if failure is not None:  # a new source's failure goes to _errors/; an old one keeps its row and features
        row = work["old"] or unreadable_source_row(
            work["input_file"], failure, output=output, staging=staging,
            data_name=data_name or data_file_name(work["source"]), metadata=metadata, run_id=run_id)
        return {"row": row, "counts": step.counts, "failed": failure, "opened": step.opened}
    step.decide(input_location, id_column)
    new_name = data_name or data_file_name(work["source"])
    data = step.write_data(new_name, staging, metadata, dense, list_vectors)
    errors = step.write_errors(new_name, staging, metadata)
    row = step.row(data, errors, id_type=id_type, run_id=run_id)
    return {"row": row, "counts": step.counts, "failed": None, "opened": step.opened}


def unreadable_source_row(info: InputFile, message: str, *, output: Location, staging: Location, data_name: str,
                          metadata: dict[bytes, bytes], run_id: str) -> dict[str, Any]:
    """The sources-table row of a new input file that could not be read at all (0 bytes, no footer), its
    error file staged: one ``_errors/`` row (null id, stage ``read``, the reason), where every failure is.

    Its identity is marked unreadable, so that the next night reads the file again (fixed, it is
    featurized and this row's failure dropped: a re-read source's null-id rows are reported anew).
    """
    error_name = f"{ERRORS_DIR}/{error_file_name(data_name)}"
    table = pa.table({ID_COLUMN: pa.nulls(1, pa.string()), HASH_COLUMN: pa.nulls(1, pa.string()),
                      "stage": [READ_STAGE], "error": [message]}, schema=ERROR_SCHEMA)
    _write_final(output.filesystem(), staging, error_name, table.replace_schema_metadata(metadata))
    return {
        "source": info.relpath, "size": info.size, "identity": f"unreadable:{info.identity}", "input_rows": 0,
        "file": None, "rows": 0, "error_file": error_name, "errors": 1, "id_min": None, "id_max": None,
        "orphans": 0, "present": True, "run_id": run_id,
    }


class _SourceFinalizer:
    """The steps of :func:`finalize_source` for one source, in order: read what the run staged,
    decide from the ids alone which old rows stay (and count why the others go), write the
    new data and error files, describe them in the source's new row."""

    def __init__(self, work: dict[str, Any], *, output: Location, prune: bool) -> None:
        self.work, self.output, self.prune = work, output, prune
        self.fs = output.filesystem()
        self.old = work["old"]
        self.counts = dict.fromkeys(FINALIZE_COUNTS, 0)
        self.opened: set[str] = set()

    # -- 1. what the run staged ---------------------------------------------------------------
    def read_staged(self) -> str | None:
        """Read the staged ids and errors, one row per id (the first); the read error if the source failed."""
        fs = self.fs
        self.staged_ids = [pq.read_table(path, columns=[ID_COLUMN], filesystem=fs) for path in self.work["staged_files"]]
        self.staged_ok = pa.concat_tables(self.staged_ids) if self.staged_ids else None
        self.staged_err = _read_many(fs, self.work["staged_error_files"], ERROR_SCHEMA)
        staged_err = self.staged_err
        if staged_err is not None and _count(pc.equal(staged_err.column("stage"), READ_STAGE)):
            return pc.filter(staged_err.column("error"), pc.equal(staged_err.column("stage"), READ_STAGE))[0].as_py()
        self.staged_keep = None
        if self.staged_ok is not None:
            self.staged_keep = _first_rows(self.staged_ok)
            self.staged_ok = self.staged_ok.filter(pa.array(self.staged_keep))
        if staged_err is not None:
            valid = staged_err.filter(pc.is_valid(staged_err.column(ID_COLUMN)))
            self.staged_err = pa.concat_tables(
                [_first_per_id(valid), staged_err.filter(pc.is_null(staged_err.column(ID_COLUMN)))]
            )
        carried = self.work.get("carried_file")
        self.carried = pq.read_table(carried, filesystem=fs) if carried else None
        if self.carried is not None and not self.carried.num_rows:
            self.carried = None
        return None

    # -- 2. the decisions, on ids -------------------------------------------------------------
    def decide(self, input_location: Location, id_column: str) -> None:
        """Which previous rows stay (``keep_ok_mask``, ``keep_err_mask``), and the counts."""
        work, staged_ok, staged_err = self.work, self.staged_ok, self.staged_err
        self.touched = pa.concat_arrays(
            [t.column(ID_COLUMN).combine_chunks() for t in (staged_ok, staged_err, self.carried) if t is not None]
            or [pa.array([], pa.string())]
        ).drop_null()
        self.moved = read_moved_ids(work["moved_ids"])
        self.current = None  # the input file's ids now, when a night needs them
        if work["input_file"] and (self.prune or work["kind"] != "new"):
            ids = read_columns(input_location, work["input_file"], [id_column]).column(0)
            self.current = ids.cast(pa.string()).combine_chunks().drop_null()
        self.old_ids = self._previous(self.old and self.old["file"], [ID_COLUMN])
        self.old_err = self._previous(self.old and self.old["error_file"])
        if self.old_err is not None:
            self.old_err = self.old_err.cast(ERROR_SCHEMA)
        self.keep_ok_mask = pc.invert(self._drop_mask(self.old_ids)) if self.old_ids is not None else None
        self.keep_err_mask = pc.invert(self._drop_mask(self.old_err)) if self.old_err is not None else None
        self._count_replaced_and_failed()
        self._count_moved_and_deleted()
        self.counts["written"] = staged_ok.num_rows if staged_ok is not None else 0
        self.counts["carried"] = self.carried.num_rows if self.carried is not None else 0

    def _previous(self, name: str | None, columns: list[str] | None = None) -> pa.Table | None:
        if not name:
            return None
        self.opened.add(name)
        return pq.read_table(self.output.child_path(name), columns=columns, filesystem=self.fs)

    def _drop_mask(self, table: pa.Table) -> pa.Array:
        """The previous rows that go: re-featurized or failed now, moved, deleted (--prune)."""
        mask = pc.or_(_ids_in(table, self.touched), _ids_in(table, self.moved))
        if self.prune and self.current is not None:
            mask = pc.or_(mask, pc.invert(_ids_in(table, self.current)))
        elif self.prune and not self.work["listed"]:
            mask = pa.array(np.ones(table.num_rows, dtype=bool))
        if self.work["reads_payloads"]:  # the source was re-read: its null-id rows were reported again
            mask = pc.or_(mask, pc.is_null(table.column(ID_COLUMN)))
        return pc.fill_null(mask, True)

    def _count_replaced_and_failed(self) -> None:
        counts, staged_ok, staged_err = self.counts, self.staged_ok, self.staged_err
        if self.old_ids is not None:
            known_ok = self.old_ids.column(ID_COLUMN)
            counts["replaced"] = _count(_ids_in(staged_ok, known_ok)) if staged_ok is not None else 0
            counts["removed_failed"] = (
                _count(pc.is_in(staged_err.column(ID_COLUMN), value_set=known_ok)) if staged_err is not None else 0
            )
            counts["replaced"] += counts["removed_failed"]
        if staged_err is not None:  # a failure already recorded with the same payload is not new
            before = self.old_err if self.old_err is not None else ERROR_SCHEMA.empty_table()
            known = _count(pc.is_in(_error_keys(staged_err), value_set=_error_keys(before).combine_chunks()))
            counts["failed_known"], counts["failed_new"] = known, staged_err.num_rows - known

    def _count_moved_and_deleted(self) -> None:
        for table, mask in ((self.old_ids, self.keep_ok_mask), (self.old_err, self.keep_err_mask)):
            if table is None:
                continue
            dropped = pc.invert(mask)
            self.counts["moved"] += _count(pc.and_(dropped, _ids_in(table, self.moved)))
            if self.prune and (self.current is not None or not self.work["listed"]):
                gone = pc.invert(_ids_in(table, self.current)) if self.current is not None else dropped
                stayed = pc.or_(_ids_in(table, self.touched), _ids_in(table, self.moved))  # written again here or elsewhere
                self.counts["deleted"] += _count(pc.and_(pc.and_(dropped, gone), pc.invert(stayed)))

    # -- 3. the files -------------------------------------------------------------------------
    def write_data(self, new_name: str, staging: Location, metadata: dict[bytes, bytes], dense: bool,
                   list_vectors: bool) -> tuple[str | None, pa.ChunkedArray | None]:
        """(name, ids) of the source's data file: the old one when untouched, else a new one streamed from
        the kept old rows, the rows carried from donor files (every column as committed) and the staged
        blocks; (None, None) when no row is left."""
        old, old_ids, keep = self.old, self.old_ids, self.keep_ok_mask
        if old_ids is not None and _count(pc.invert(keep)) == 0 and self.staged_ok is None and self.carried is None:
            return old["file"], old_ids.column(ID_COLUMN)  # untouched: the old file stays
        kept_old = old_ids is not None and _count(keep) > 0
        donors = self._donor_rows()
        if not (kept_old or donors or self.counts["written"]):
            return None, None
        parts = [old_ids.filter(keep)] if kept_old else []
        parts += [ids.filter(mask) for _, ids, mask in donors]
        data_ids = pa.concat_tables([*parts, *([self.staged_ok] if self.counts["written"] else [])]).column(ID_COLUMN)
        path = staged_final_path(staging, new_name)
        self.fs.create_dir(posixpath.dirname(path), recursive=True)
        final = _FinalFile(self.fs, path, metadata, dense, list_vectors)
        if kept_old:
            final.write_file(self.output.child_path(old["file"]), pc.fill_null(keep, False).to_numpy(zero_copy_only=False))
        for name, _, mask in donors:
            final.write_file(self.output.child_path(name), mask.to_numpy(zero_copy_only=False))
        offsets = np.cumsum([0, *(t.num_rows for t in self.staged_ids)])
        for index, staged in enumerate(self.work["staged_files"]):
            final.write_file(staged, self.staged_keep[offsets[index] : offsets[index + 1]])
        final.close()
        self.counts["rewritten"] += 1
        return new_name, data_ids

    def _donor_rows(self) -> list[tuple[str, pa.Table, pa.Array]]:
        """(file, its ids, the rows carried from it) of each donor file the read task carried rows from."""
        if self.carried is None:
            return []
        donors = []
        for name in pc.unique(self.carried.column("file")).to_pylist():
            wanted = self.carried.filter(pc.equal(self.carried.column("file"), name)).column(ID_COLUMN)
            ids = self._previous(name, [ID_COLUMN])
            mask = pc.fill_null(pc.is_in(ids.column(ID_COLUMN), value_set=wanted.combine_chunks()), False)
            donors.append((name, ids, mask))
        return donors

    def write_errors(self, new_name: str, staging: Location,
                     metadata: dict[bytes, bytes]) -> tuple[str | None, pa.ChunkedArray | None]:
        """(name, ids) of the source's error file, as :meth:`write_data` for the data file."""
        old_err, keep = self.old_err, self.keep_err_mask
        if old_err is not None and _count(pc.invert(keep)) == 0 and self.staged_err is None:
            return self.old["error_file"], old_err.column(ID_COLUMN)
        kept = old_err.filter(keep) if old_err is not None else None
        parts = [t for t in (kept, self.staged_err) if t is not None and t.num_rows]
        if not parts:
            return None, None
        table = pa.concat_tables([p.cast(ERROR_SCHEMA) for p in parts]).replace_schema_metadata(metadata)
        error_name = f"{ERRORS_DIR}/{error_file_name(new_name)}"
        _write_final(self.fs, staging, error_name, table)
        self.counts["rewritten"] += 1
        return error_name, table.column(ID_COLUMN)

    # -- 4. the source's row ------------------------------------------------------------------
    def row(self, data: tuple[str | None, pa.ChunkedArray | None], errors: tuple[str | None, pa.ChunkedArray | None],
            *, id_type: pa.DataType, run_id: str) -> dict[str, Any]:
        """The source's new sources-table row: its files, counts, id range and orphans."""
        (data_name, data_ids), (error_name, error_ids) = data, errors
        work, old = self.work, self.old or {}
        all_ids = pa.chunked_array(
            [c for ids in (data_ids, error_ids) if ids is not None for c in ids.chunks], pa.string()
        ).combine_chunks().drop_null()
        typed = all_ids.cast(id_type)
        bounds = pc.min_max(typed) if len(typed) else None
        if self.current is not None:  # rows whose id the input file no longer has (kept without --prune)
            orphans = _count(pc.invert(pc.is_in(all_ids, value_set=self.current)))
        elif not work["listed"]:
            orphans = len(all_ids)
        else:
            orphans = old.get("orphans") or 0
        info = work["input"] or {}
        return {
            "source": work["source"],
            "size": info.get("size", old.get("size")),
            "identity": info.get("identity", old.get("identity")),
            "input_rows": work["input_rows"] if work["input_rows"] is not None else old.get("input_rows", 0),
            "file": data_name,
            "rows": len(data_ids) if data_ids is not None else 0,
            "error_file": error_name,
            "errors": len(error_ids) if error_ids is not None else 0,
            "id_min": bounds["min"].as_py() if bounds else None,
            "id_max": bounds["max"].as_py() if bounds else None,
            "orphans": orphans,
            "present": work["listed"],
            "run_id": run_id if self.counts["rewritten"] else old.get("run_id", run_id),
        }


def _error_keys(errors: pa.Table) -> pa.ChunkedArray:
    """``id`` and payload hash of each error row, joined: the same failure of the same input."""
    return pc.binary_join_element_wise(
        pc.fill_null(errors.column(ID_COLUMN), ""), pc.fill_null(errors.column(HASH_COLUMN), ""), "\x00"
    )


def _write_final(fs: Any, staging: Location, name: str, table: pa.Table) -> None:
    path = staged_final_path(staging, name)
    fs.create_dir(staging.child_path(FINAL_DIR, ERRORS_DIR), recursive=True)
    pq.write_table(table, path, filesystem=fs)
    fsync_file(fs, path)
