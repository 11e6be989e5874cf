"""The Ray Data stream of a run, and the finalize tasks that turn its blocks into files.

read (one task per input file, record batches) -> decode (CPU tasks) -> featurize (an actor
pool that keeps the frozen model loaded; GPUs in production) -> stage (tasks writing each
block's rows and error rows per source to the run's staging area). Then one finalize task
per touched source merges its previous file with its staged blocks into its new data file
and error file, with the rows it carries unchanged from other sources' files
(:func:`pipelines.job.finalize.finalize_source`). The driver only gathers one
stats row per staged block and one sources-table row per touched source.
"""
from __future__ import annotations

import functools
import pickle
from datetime import datetime, timezone
from typing import Any, NamedTuple

import pyarrow as pa

from fungi_ops.batch_size import stream_batch_size
from pipelines.config import FeaturizeConfig
from pipelines.formats.base import OutputTable
from pipelines.inputs import InputColumns, InputSchema
from pipelines.job.actor import FeaturizeActor
from pipelines.job.decode import decode_batch
from pipelines.job.finalize import FinalizeWork, finalize_source
from pipelines.job.plan import NightPlan
from pipelines.job.read import read_sources
from pipelines.job.spec_resolution import ResolvedSpec
from pipelines.job.stage import write_batch
from pipelines.layout import carried_path, spec_metadata
from pipelines.storage import Location
from pipelines.tasks import Tasks

MAX_ROWS_PER_BLOCK = 4096
MAX_BLOCK_BYTES = 128 << 20  # of features: Ray Data's own target block size (a 512-px dense ViT-B row is 6 MiB)


class ActorResources(NamedTuple):
    """The featurize actor pool: its size (N, or (MIN, MAX)), and GPUs and CPUs per actor."""

    pool: tuple[int, int] | int
    gpus: float
    cpus: float


def actor_resources(config: FeaturizeConfig) -> ActorResources:
    """(pool size, GPUs per actor, CPUs per actor) from the settings and the cluster."""
    from pipelines.ray_runtime import cluster_resources

    cpus, gpus = cluster_resources()
    gpus_per_actor = config.gpus_per_actor if config.gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
    if config.actors:
        low, high = config.actors
    elif gpus_per_actor > 0:
        low = high = max(1, int(gpus // gpus_per_actor))
    else:
        low = high = max(1, int(cpus) - 1) if cpus > 2 else max(1, int(cpus))
    # CPU actors leave one CPU to the read, decode and write tasks, or the stream starves
    default_cpus = 1.0 if gpus_per_actor > 0 else max(0.25, (cpus - 1.0) / high)
    cpus_per_actor = config.cpus_per_actor if config.cpus_per_actor is not None else min(default_cpus, cpus)
    concurrency: tuple[int, int] | int = low if low == high else (low, high)
    return ActorResources(concurrency, gpus_per_actor, cpus_per_actor)


def block_rows(rows: int, actors: int, batch_size: int, row_bytes: int) -> int:
    """Rows per block of the stream: an actor task takes whole blocks.

    About four blocks per actor (load balance; a lost node costs only its blocks in flight),
    a whole batch per block unless that would leave actors without a block (32 rows, 2
    actors, batch 16: 2 blocks of 16; 9 rows: 5 and 4), and at most ``MAX_ROWS_PER_BLOCK``
    rows and ``MAX_BLOCK_BYTES`` of features (an actor holds a block's decoded samples and
    features, dense ones too: 0.75 MiB of features per image at 512 px).
    """
    share = -(-rows // actors)
    cap = min(MAX_ROWS_PER_BLOCK, max(1, MAX_BLOCK_BYTES // max(1, row_bytes)))
    return max(1, min(cap, max(min(batch_size, share), -(-rows // (4 * actors)))))


class Stream:
    """One run's stream and finalize tasks, over the sources its plan reads."""

    def __init__(self, config: FeaturizeConfig, spec: ResolvedSpec, columns: InputColumns, input_location: Location,
                 staging: Location, run_id: str, started: float, *, table_format: OutputTable, tasks: Tasks) -> None:
        self.config, self.spec, self.columns, self.input = config, spec, columns, input_location
        self.output, self.staging, self.run_id, self.started = table_format.root, staging, run_id, started
        self.table_format = table_format  # the output's format: its data files' names and vector layout
        self.tasks = tasks  # Ray, or this process for a small job (pipelines.tasks)

    @functools.cached_property
    def resources(self) -> ActorResources:
        """The actor pool's resources (asks the running Ray for its CPUs and GPUs); in process: one
        featurizer with every core (and the GPU, if this process sees one)."""
        if not self.tasks.in_process:
            return actor_resources(self.config)
        import torch

        return ActorResources(1, 1.0 if torch.cuda.is_available() else 0.0, self.tasks.cpus())

    def _read_settings(self, schema: InputSchema, rows_per_block: int) -> dict[str, Any]:
        """The keyword arguments of :func:`pipelines.job.read.read_sources`."""
        return dict(
            input_location=self.input, output=self.output, columns=self.columns, schema=schema,
            event_time=datetime.fromtimestamp(self.started, timezone.utc), rows_per_block=rows_per_block,
            retry_failed=self.config.retry_failed, staging=self.staging,
        )

    def _featurizer_settings(self, setup_state: Any) -> dict[str, Any]:
        """The constructor arguments of :class:`pipelines.job.actor.FeaturizeActor`."""
        _, gpus, cpus = self.resources
        return dict(spec_json=self.spec.json, setup_state=setup_state, threads=None if gpus else max(1, int(round(cpus))),
                    batch_size=self.config.batch_size, gpus=gpus)

    def _write_settings(self) -> dict[str, Any]:
        """The keyword arguments of :func:`pipelines.job.stage.write_batch`."""
        return dict(staging=self.staging, spec_json=self.spec.json, spec_hash=self.spec.hash, dense=self.spec.dense)

    def run(self, plan: NightPlan, schema: InputSchema, rows_to_read: int, setup_state: Any) -> list[dict[str, Any]]:
        """Stream the sources to read through decode, featurize and staging; one stats row per staged block."""
        reads = plan.to_read
        if not reads:
            return []
        concurrency, gpus_per_actor, _ = self.resources
        max_actors = concurrency if isinstance(concurrency, int) else concurrency[1]
        batch_size = stream_batch_size(self.config.batch_size, gpus_per_actor > 0)
        rows_per_block = block_rows(rows_to_read, max_actors, batch_size, self.spec.row_bytes)
        items = [
            {
                "source": work.source,
                "path": work.input.path,
                "input": pickle.dumps(work.input),
                "old_file": work.old["file"] if work.old else None,
                "old_error_file": work.old["error_file"] if work.old else None,
                "donors": work.donors,
            }
            for work in reads
        ]
        run = self._run_in_process if self.tasks.in_process else self._run_on_ray
        return run(items, schema, rows_per_block, min(batch_size, rows_per_block), setup_state)

    def _run_in_process(self, items: list[dict[str, Any]], schema: InputSchema, rows_per_block: int, batch_size: int,
                        setup_state: Any) -> list[dict[str, Any]]:
        """The stream's stages one block after another in this process (a small job: no Ray)."""
        featurize = FeaturizeActor(**self._featurizer_settings(setup_state))
        read_settings, write_settings = self._read_settings(schema, rows_per_block), self._write_settings()
        stats: list[dict[str, Any]] = []
        for item in items:
            for block in read_sources(pa.Table.from_pylist([item]), **read_settings):
                decoded = decode_batch(block, modality=self.spec.modality, decoder=self.spec.decoder)
                featurized = pa.concat_tables(
                    featurize(decoded.slice(start, batch_size)) for start in range(0, decoded.num_rows, batch_size)
                )
                stats.extend(write_batch(featurized, **write_settings).to_pylist())
        return stats

    def _run_on_ray(self, items: list[dict[str, Any]], schema: InputSchema, rows_per_block: int, batch_size: int,
                    setup_state: Any) -> list[dict[str, Any]]:
        """The stream on Ray Data: read and decode tasks, the featurize actor pool, write tasks."""
        import ray

        concurrency, gpus_per_actor, cpus_per_actor = self.resources
        read = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            read_sources,
            batch_format="pyarrow",
            batch_size=1,
            num_cpus=0.25,
            fn_kwargs=self._read_settings(schema, rows_per_block),
        )  # blocks of rows_per_block rows already (no repartition: its tasks each ask a whole CPU)
        decoded = read.map_batches(
            decode_batch,
            batch_format="pyarrow",
            num_cpus=0.25,
            fn_kwargs=dict(modality=self.spec.modality, decoder=self.spec.decoder),
        )
        # CPU actors take one block at a time, so that a small job's few blocks spread over
        # every actor instead of queueing at the first one to start (measured: 2 actors, 2
        # blocks, one actor took both); GPU actors keep Ray Data's default, which prefetches
        sizes = {"size": concurrency} if isinstance(concurrency, int) else {"min_size": concurrency[0], "max_size": concurrency[1]}
        in_flight = None if gpus_per_actor else 1
        shared_state = setup_state if isinstance(setup_state, ray.ObjectRef) or not setup_state else ray.put(setup_state)
        featurized = decoded.map_batches(
            FeaturizeActor,
            batch_format="pyarrow",
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(**sizes, max_tasks_in_flight_per_actor=in_flight),
            num_gpus=gpus_per_actor,
            num_cpus=cpus_per_actor,
            fn_constructor_kwargs=self._featurizer_settings(shared_state),
        )
        written = featurized.map_batches(
            write_batch,
            batch_format="pyarrow",
            batch_size=None,
            num_cpus=0.25,
            fn_kwargs=self._write_settings(),
        )
        return written.take_all()

    def finalize(self, plan: NightPlan, stats: list[dict[str, Any]], input_rows: dict[str, int], id_type: pa.DataType) -> list[dict[str, Any]]:
        """One task per touched source: its new files in staging and its new sources-table row."""
        staged: dict[str, tuple[set[str], set[str]]] = {}
        for row in stats:
            files, error_files = staged.setdefault(row["source"], (set(), set()))
            if row["file"]:
                files.add(row["file"])
            if row["error_file"]:
                error_files.add(row["error_file"])
        task = self.tasks.remote(finalize_source, num_cpus=0.25)
        metadata = spec_metadata(self.spec.json, self.spec.hash)
        refs = []
        for work in plan.work.values():
            files, error_files = staged.get(work.source, (set(), set()))
            description = FinalizeWork(
                planned=work, listed=work.source in plan.listed, input_rows=input_rows.get(work.source),
                staged_files=sorted(files), staged_error_files=sorted(error_files),
                carried_file=carried_path(self.staging, work.source) if work.donors else None,
            )
            refs.append(task(
                description, input_location=self.input, output=self.output, staging=self.staging,
                id_column=self.columns.id, id_type=id_type, run_id=self.run_id, prune=self.config.prune,
                metadata=metadata, dense=self.spec.dense, data_name=self.table_format.data_name(work.source, self.run_id),
                list_vectors=self.table_format.list_vectors,
            ))
        return self.tasks.get(refs)
