"""The setup state of a run: SimCLR's negatives, or a dense spec's support index.

Drawn from ``--setup-from`` (``--support-from``; by default the input) with a seeded hash
of the ids, whatever the file layout, decoded in a Ray task and encoded in Ray tasks that
overlap the actors' start; the actors take the state's ``ObjectRef``. An incremental night
reuses the state its output was featurized with, so a spec's features never change from
night to night; other runs save theirs under a name of their own, committed with them.
"""
from __future__ import annotations

import pickle
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from fungi_ops.batch_size import stream_batch_size
from fungi_ops.errors import ConfigError
from pipelines.config import FeaturizeConfig
from pipelines.layout import SETUP_DIR
from pipelines.formats.sources import InputListing, file_schemas, list_sources, read_batches, read_columns
from pipelines.inputs import InputColumns, check_schemas, read_footers
from pipelines.manifest import Manifest
from pipelines.job.spec_resolution import ResolvedSpec
from pipelines.storage import InputFile, Location, read_bytes, write_atomic
from pipelines.tasks import Tasks

SETUP_READ_ROWS = 4096  # rows per batch while the drawn rows are picked out of the files


class SetupStage:
    """The setup state of one run (nothing to do for a spec without setup rows).

    ``actor_resources`` is the job's (pool size, GPUs per actor, CPUs per actor): the rows
    are encoded in one part per CPU actor, or on one accelerator; ``tasks`` runs the draw
    and the encoding (Ray tasks, or this process for a small job).
    """

    def __init__(self, config: FeaturizeConfig, spec: ResolvedSpec, columns: InputColumns, input_listing: InputListing,
                 root: Location, run_id: str, actor_resources: tuple[Any, float, float], tasks: Tasks) -> None:
        self.config, self.spec, self.columns, self.input = config, spec, columns, input_listing
        self.root, self.run_id, self.actor_resources, self.tasks = root, run_id, actor_resources, tasks
        self.setup_draw: tuple[Any, Any, str] | None = None  # the draw's order and skipped rows (refs), source

    def start(self, previous: Manifest | None) -> tuple[Any, str | None]:
        """The setup state for this spec: the output's own, or a Ray task computing it.

        An incremental night keeps the state its output was featurized with (the features
        of a spec must not change from night to night, even if the training split did);
        another run computes it afresh under a name of its own, committed with it.

        A fresh state is returned as the ``ObjectRef`` of a Ray task and saved by
        :meth:`save` once the stream has run: the actors take the reference, so their
        start (worker processes, model loading) and the read and decode stages overlap the
        selection, decoding and encoding of the setup rows instead of waiting for them.
        """
        count = self.spec.setup_rows
        if not count:
            return None, None
        if self.config.incremental and previous is not None and previous.setup_artifact:
            return read_setup_state(self.root, previous.setup_artifact), previous.setup_artifact
        chosen = self.config.support_from or self.config.setup_from
        flag = "--support-from" if self.spec.dense else "--setup-from"
        unreadable: dict[str, str] | None = None
        if chosen:
            listing = list_sources(chosen, self.config.storage_options, self.config.catalog, what="setup data", flag=flag)
        else:
            listing, unreadable = self.input, {}  # the input's unreadable files fail alone: drawn from the others
            print(f"fungi: {self.what} drawn from the input (pass {flag} to use a training split)")
        source, files = listing.location, listing.files
        setup_columns = InputColumns(self.columns.id, self.columns.data)
        footers = read_footers(source, files, unreadable)
        if unreadable:
            files = [f for f in files if f.relpath not in unreadable]
            footers = [footer for footer in footers if footer is not None]
        check_schemas(source, files, file_schemas(listing, footers), setup_columns, self.spec.modality)
        return self._start_tasks(source, files, count), f"{SETUP_DIR}/{self.spec.hash}-{self.run_id}.safetensors"

    def check_draw(self) -> None:
        """ConfigError (exit 2) when no setup row decodes; waits for the draw started by :meth:`start`.

        Rows that do not decode are reported here, on the driver, in one line (the task
        that found them logs nothing: Ray would forward one stderr line per row).
        """
        if self.setup_draw is None:
            return
        order_ref, skipped_ref, source = self.setup_draw
        order, skipped = self.tasks.get([order_ref, skipped_ref])
        examples = "; ".join(skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
        if not order:
            raise ConfigError(
                f"no decodable rows in {source} to compute the setup state ({self.what}) from: "
                f"{len(skipped)} drawn, e.g. {examples}"
            )
        if skipped:
            print(f"fungi: {len(skipped)} of {len(skipped) + len(order)} rows drawn for {self.what} "
                  f"do not decode and are left out: {examples}")

    @property
    def what(self) -> str:
        """What the setup rows are for, in messages."""
        return "the dense support" if self.spec.dense else "simclr negatives"

    def save(self, state: Any, relative: str | None) -> None:
        """Write a freshly computed setup state beside the output (a loaded one is already there)."""
        from safetensors.numpy import save

        if self.setup_draw is None:  # loaded from the output, or no setup rows
            return
        blob = save(self.tasks.get(state), metadata={"fungi.spec_hash": self.spec.hash})
        fs = self.root.filesystem()
        fs.create_dir(self.root.child_path(SETUP_DIR), recursive=True)
        write_atomic(fs, self.root.child_path(relative), blob)

    def _start_tasks(self, source: Location, files: list[InputFile], count: int) -> Any:
        """Draw and decode the setup rows (a Ray task, waited for), then start encoding them.

        Returns the ObjectRef of the setup state. On CPUs the rows are encoded in as many parts
        as there are CPU actors, one task each with its share of the cores (measured on 2 cores:
        64 negatives x 49 views in 56.8 s as 2 one-thread tasks, 67.1 s as one two-thread task),
        cut at encoding-chunk boundaries so that the state is bit-identical to one task's. The
        tasks reserve no CPU: the actors wait for their result while they start, so they have
        the cores mostly to themselves, and the read and decode tasks are not held back. With
        accelerators one task encodes everything on an actor's accelerator.
        """
        concurrency, gpus, _ = self.actor_resources
        parts = 1 if gpus or not self.spec.setup_splits else (concurrency if isinstance(concurrency, int) else concurrency[1])
        chunk = max(1, stream_batch_size(self.config.batch_size, gpus > 0) // 4)
        select = self.tasks.remote(select_setup_rows, num_cpus=0.25, num_returns=parts + 2)
        refs = select(self.spec.json, self.spec.decoder, source, files, self.columns.id, self.columns.data, count, parts, chunk)
        order_ref, skipped_ref, part_refs = refs[0], refs[1], refs[2:]
        self.setup_draw = (order_ref, skipped_ref, source.uri)  # checked by check_draw before the stream
        cores = int(self.tasks.cpus())
        encode = self.tasks.remote(encode_setup_rows, num_gpus=gpus, num_cpus=1 if gpus else 0)
        threads = None if gpus else max(1, cores // parts)
        encoded = [encode(self.spec.json, part, chunk, threads) for part in part_refs]
        if not self.spec.setup_splits:  # one part, in draw order: images keep it (a dense support is no row table)
            return encoded[0]
        return self.tasks.remote(merge_setup_parts, num_cpus=0)(order_ref, *encoded)


def read_setup_state(root: Location, relative: str) -> dict[str, Any]:
    """The setup state an output committed (``relative``: its manifest's ``setup_artifact``), as arrays:
    what a night that keeps its output's spec and a serving replica give the featurize actor."""
    from safetensors.numpy import load

    return load(read_bytes(root.filesystem(), root.child_path(relative)))


def select_setup_rows(spec_json: str, decoder: bytes, source: Location, files: list[InputFile], id_column: str,
                      data_column: str, count: int, parts: int, chunk: int) -> tuple[list, ...]:
    """Ray task: the ``count`` setup rows, decoded, in ``parts`` parts to encode.

    The rows are the ``count`` with the smallest seeded hash of their id, whatever the file
    layout (:func:`fungi_ops.seeding.setup_order`); rows that do not decode are left out
    and returned as ``"id: reason"`` lines, for the driver to report.
    ``decoder`` is the job's (:attr:`ResolvedSpec.decoder`): a dense spec's support images
    get the view its features are computed on. Returns the rows' encoding order
    (:func:`fungi_ops.featurizer.setup_encoding_order`, for :func:`merge_setup_parts`),
    the skipped rows, then the parts: ``(keys, samples)`` in that order, cut at multiples of
    ``chunk`` rows, so that the parts encode the chunks one process would.
    """
    from fungi_ops.featurizer import setup_encoding_order
    from fungi_ops.seeding import setup_order
    from fungi_ops.spec import FeaturizerSpec

    spec = FeaturizerSpec.from_json(spec_json)
    ids = [str(v) for f in files for v in read_columns(source, f, [id_column]).column(0).to_pylist() if v is not None]
    chosen = pa.array([ids[i] for i in setup_order(spec.seed, ids)[:count]])
    picked = [
        batch.filter(pc.is_in(pc.cast(batch.column(0), pa.string()), value_set=chosen))
        for f in files for batch in read_batches(source, f, [id_column, data_column], SETUP_READ_ROWS)
    ] if len(chosen) else []
    decode = pickle.loads(decoder).decode
    samples, keys, skipped = [], [], []
    for batch in picked:
        for row_id, payload in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            try:
                samples.append(decode(payload))
                keys.append(str(row_id))
            except Exception as exc:  # noqa: BLE001 - a bad setup row is left out, not fatal
                skipped.append(f"{row_id}: {exc}")
    drawn = setup_order(spec.seed, keys)
    keys, samples = [keys[i] for i in drawn], [samples[i] for i in drawn]
    order = setup_encoding_order(samples)
    keys, samples = [keys[i] for i in order], [samples[i] for i in order]
    step = -(-(-(-len(keys) // parts)) // chunk) * chunk  # rows per part, a multiple of chunk
    cuts = [(start, start + step) for start in range(0, step * parts, step)] if keys else [(0, 0)] * parts
    return (order, skipped, *((keys[a:b], samples[a:b]) for a, b in cuts))


def encode_setup_rows(spec_json: str, part: tuple[list[str], list], chunk: int, threads: int | None) -> dict:
    """Ray task: the setup state of one part of the decoded setup rows (SimCLR negatives, or the
    dense support index and latents), as numpy arrays by name: what ``safetensors.numpy``
    saves as the artifact and what the actors' featurizer's ``load_setup_state`` takes.
    """
    import torch

    from fungi_ops import FeaturizerSpec, make_featurizer

    keys, samples = part
    featurizer = make_featurizer(FeaturizerSpec.from_json(spec_json))
    if threads and featurizer.device.type == "cpu":
        torch.set_num_threads(threads)
    if not keys:
        return {}
    featurizer.setup(samples, keys, batch_size=chunk)
    return {k: v.numpy() for k, v in featurizer.setup_state().items()}


def merge_setup_parts(order: list[int], *parts: dict) -> dict:
    """Ray task: the setup state of the whole, rows in draw order, from its parts in encoding ``order``."""
    import numpy as np

    parts = tuple(p for p in parts if p)
    if not parts:  # no setup row decoded: the job stops before anything waits for this
        return {}
    inverse = np.argsort(np.asarray(order))
    merged = {}
    for key in parts[0]:
        encoded = np.concatenate([part[key] for part in parts])  # each sample's views are consecutive rows
        merged[key] = encoded.reshape(len(order), -1, encoded.shape[-1])[inverse].reshape(encoded.shape)
    return merged
