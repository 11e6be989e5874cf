"""One featurization run: Parquet in (disk or S3) -> FUNGI feature tables out.

Order of work, chosen so that mistakes cost seconds, not GPU hours:

1. validate settings against the input schema and the model (no data read yet);
2. reconcile with the output: refuse a different spec, clean up crashed runs, load
   the rows already featurized (``--incremental``);
3. compute or reuse the setup artifact (SimCLR negatives);
4. stream decode (CPU tasks) -> featurize (actor pool) -> write (tasks) into a staging
   area;
5. commit: move files in, rewrite files whose rows changed, write the manifest last.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from fungi_ops.errors import ConfigError
from fungi_ops.spec import FeaturizerSpec, parse_objectives
from pipelines import stages
from pipelines.manifest import Manifest, RunRecord, fingerprint, read_manifest, write_manifest
from pipelines.storage import Location, delete_file, exists, list_files

log = logging.getLogger(__name__)
DEFAULT_DATA_COLUMNS = {"image": "image", "text": "text", "audio": "audio"}
STAGING_DIR = "_staging"
ERRORS_DIR = "_errors"
SETUP_DIR = "_fungi_setup"
MAX_ROWS_PER_BLOCK = 4096


@dataclass
class FeaturizeConfig:
    """Everything a run needs; the CLI flags map one to one onto these fields."""

    input: str
    output: str
    modality: str
    model: str
    objectives: str = "kl"
    weights: str | None = None
    target_layer: str | None = None
    pooling: str | None = None
    id_column: str = "id"
    data_column: str | None = None
    keep_columns: tuple[str, ...] = ()
    setup_from: str | None = None
    seed: int = 0
    projection_dim: int | None = None
    precision: str = "auto"
    batch_size: int = 16
    actors: tuple[int, int] | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float | None = None
    incremental: bool = False
    overwrite: bool = False
    max_error_fraction: float = 0.01
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    address: str | None = None
    trust_remote_code: bool = False


@dataclass
class RunSummary:
    output: str
    spec_hash: str
    rows_in: int
    rows_skipped: int
    rows_written: int
    rows_failed: int
    wall_s: float
    max_error_fraction: float
    first_write_s: float | None = None
    steady_rows_per_s: float | None = None

    @property
    def rows_processed(self) -> int:
        return self.rows_written + self.rows_failed

    @property
    def failed_fraction(self) -> float:
        return self.rows_failed / self.rows_processed if self.rows_processed else 0.0

    @property
    def ok(self) -> bool:
        return self.failed_fraction <= self.max_error_fraction

    def line(self) -> str:
        rate = self.rows_processed / self.wall_s if self.wall_s else 0.0
        steady = (
            f" ({self.steady_rows_per_s:.1f} rows/s after the first write at {self.first_write_s:.0f} s)"
            if self.steady_rows_per_s is not None and self.first_write_s is not None
            else ""
        )
        return (
            f"fungi: rows in {self.rows_in}, skipped {self.rows_skipped}, written {self.rows_written}, "
            f"failed {self.rows_failed} ({self.failed_fraction:.1%}), {rate:.1f} rows/s{steady}, "
            f"wall {self.wall_s:.1f} s -> {self.output} (spec {self.spec_hash})"
        )


def build_spec(config: FeaturizeConfig) -> FeaturizerSpec:
    return FeaturizerSpec(
        model=config.model,
        modality=config.modality,
        weights=config.weights,
        target_layer=config.target_layer,
        pooling=config.pooling,
        objectives=parse_objectives(config.objectives),
        seed=config.seed,
        projection_dim=config.projection_dim,
        precision=config.precision,
    )


def resolve(config: FeaturizeConfig) -> tuple[FeaturizerSpec, Any]:
    """Resolved spec and input settings, from the model alone (fails fast on bad settings)."""
    from fungi_ops.backbones import load_backbone
    from fungi_ops.featurizer import resolve_spec

    spec = build_spec(config)
    backbone = load_backbone(
        spec.model, spec.modality, weights=spec.weights, seed=spec.seed, pooling=spec.pooling,
        trust_remote_code=config.trust_remote_code,
    )
    return resolve_spec(spec, backbone), backbone.input_config


def parquet_files(location: Location, what: str) -> list[Any]:
    """Data files under a Parquet file or directory (``_``/``.``-prefixed entries are metadata)."""
    fs = location.filesystem()
    info = fs.get_file_info(location.path)
    if info.type.name == "NotFound":
        raise ConfigError(f"{what} {location.uri} does not exist")
    if info.type.name == "File":
        return [info]
    files = [
        f
        for f in list_files(fs, location.path, ".parquet", recursive=True)
        if not any(part.startswith(("_", ".")) for part in f.path[len(location.path) :].split("/"))
    ]
    if not files:
        raise ConfigError(f"{what} {location.uri} holds no Parquet files")
    return files


def check_columns(location: Location, files: list[Any], required: dict[str, str]) -> pa.Schema:
    schema = pq.read_schema(files[0].path, filesystem=location.filesystem())
    for role, name in required.items():
        if name not in schema.names:
            raise ConfigError(
                f"{role} column '{name}' not found in {location.uri}; columns: {', '.join(schema.names)}"
            )
    return schema


class FeaturizeJob:
    """A configured run; :meth:`run` executes it and returns the summary."""

    def __init__(self, config: FeaturizeConfig) -> None:
        self.config = config
        self.data_column = config.data_column or DEFAULT_DATA_COLUMNS.get(config.modality, "data")
        self.input = Location(config.input, config.storage_options)
        self.output = Location(config.output, config.storage_options)
        self.run_id = uuid.uuid4().hex[:12]

    # -- 1. validation ----------------------------------------------------------
    def validate(self) -> None:
        config = self.config
        if not 0 <= config.max_error_fraction <= 1:
            raise ConfigError("--max-error-fraction must be within [0, 1]")
        if config.batch_size < 1:
            raise ConfigError("--batch-size must be >= 1")
        if config.incremental and config.overwrite:
            raise ConfigError("--incremental and --overwrite contradict each other")
        reserved = {stages.ID_COLUMN, stages.HASH_COLUMN, "embedding"} | {c for c in config.keep_columns if c.startswith("grad_")}
        clash = sorted(set(config.keep_columns) & reserved)
        if clash:
            raise ConfigError(f"--keep-columns {', '.join(clash)} would clash with output columns")
        self.input_files = parquet_files(self.input, "input")
        required = {"id": config.id_column, "data": self.data_column}
        required.update({f"kept ({name})": name for name in config.keep_columns})
        check_columns(self.input, self.input_files, required)
        fs = self.input.filesystem()
        self.rows_in = sum(pq.ParquetFile(f.path, filesystem=fs).metadata.num_rows for f in self.input_files)
        self.spec, self.input_config = resolve(config)

    # -- 2. output reconciliation ------------------------------------------------
    def reconcile_output(self) -> Manifest | None:
        fs = self.output.filesystem()
        manifest = read_manifest(fs, self.output.path)
        if manifest and manifest.spec_hash != self.spec.hash and not self.config.overwrite:
            raise ConfigError(
                f"output {self.output.uri} holds features of spec {manifest.spec_hash} "
                f"(model {manifest.spec.get('model')}); this run is spec {self.spec.hash}. "
                "Use another output, or --overwrite to replace it"
            )
        if manifest is None and not self.config.overwrite:
            stray = [f for f in list_files(fs, self.output.path, ".parquet")]
            if stray:
                raise ConfigError(
                    f"output {self.output.uri} holds Parquet files but no fungi manifest; "
                    "refusing to mix with them (use --overwrite to replace)"
                )
        committed = set(manifest.files) if manifest and manifest.spec_hash == self.spec.hash else set()
        for info in list_files(fs, self.output.path, ".parquet"):
            if info.path.rsplit("/", 1)[-1] not in committed:
                delete_file(fs, info.path)  # leftover of a crashed commit, or replaced by --overwrite
        for info in list_files(fs, self.output.child_path(STAGING_DIR), recursive=True):
            delete_file(fs, info.path)
        if manifest and manifest.spec_hash != self.spec.hash:
            return None
        return manifest

    def known_hashes(self, manifest: Manifest | None) -> dict[str, str] | None:
        if not self.config.incremental or manifest is None or not manifest.files:
            return None
        table = pq.ParquetDataset(
            [self.output.child_path(name) for name in manifest.files], filesystem=self.output.filesystem()
        ).read(columns=[stages.ID_COLUMN, stages.HASH_COLUMN])
        return dict(zip(table.column(0).to_pylist(), table.column(1).to_pylist()))

    # -- 3. setup artifact ---------------------------------------------------------
    def setup_state(self) -> tuple[Any, str | None]:
        """The setup state for this spec: loaded from the output, or an encode task in flight.

        A fresh state is returned as the ``ObjectRef`` of a Ray task and saved by
        :meth:`save_setup` once the stream has run: the actors take the reference, so their
        start (worker processes, model loading) and the read and decode stages overlap the
        encoding of the negatives instead of waiting for it.
        """
        count = self.spec.setup_rows
        if not count:
            return None, None
        fs = self.output.filesystem()
        relative = f"{SETUP_DIR}/{self.spec.hash}.safetensors"
        path = self.output.child_path(relative)
        if exists(fs, path):
            from safetensors.torch import load

            with fs.open_input_stream(path) as handle:
                return {k: v.numpy() for k, v in load(handle.read()).items()}, relative
        source = Location(self.config.setup_from, self.config.storage_options) if self.config.setup_from else self.input
        if not self.config.setup_from:
            print("fungi: simclr negatives drawn from the input (pass --setup-from to use a training split)")
        samples, keys = self.select_setup_rows(source, count)
        return _start_setup(self.spec.to_json(), samples, keys, self.config), relative

    def save_setup(self, state: Any, relative: str | None) -> None:
        """Write a freshly computed setup state beside the output (a loaded one is already there)."""
        import ray

        if not isinstance(state, ray.ObjectRef):
            return
        import torch
        from safetensors.torch import save

        blob = save({k: torch.tensor(v) for k, v in ray.get(state).items()}, metadata={"fungi.spec_hash": self.spec.hash})
        fs = self.output.filesystem()
        fs.create_dir(self.output.child_path(SETUP_DIR), recursive=True)
        with fs.open_output_stream(self.output.child_path(relative)) as handle:
            handle.write(blob)

    def select_setup_rows(self, source: Location, count: int) -> tuple[list, list[str]]:
        """The ``count`` rows with the smallest seeded hash of their id: independent of file layout."""
        from fungi_ops.seeding import setup_order

        files = parquet_files(source, "setup data")
        check_columns(source, files, {"id": self.config.id_column, "data": self.data_column})
        fs = source.filesystem()
        dataset = pads.dataset([f.path for f in files], filesystem=fs, format="parquet")
        ids = [str(v) for v in dataset.to_table(columns=[self.config.id_column]).column(0).to_pylist() if v is not None]
        chosen = [ids[i] for i in setup_order(self.spec.seed, ids)[:count]]
        id_type = dataset.schema.field(self.config.id_column).type
        table = dataset.to_table(
            columns=[self.config.id_column, self.data_column],
            filter=pc.field(self.config.id_column).isin(pa.array(chosen).cast(id_type)),
        )
        from fungi_ops.adapters import make_decoder

        decoder = make_decoder(self.spec.modality, self.input_config)
        samples, keys = [], []
        for row_id, payload in zip(table.column(0).to_pylist(), table.column(1).to_pylist()):
            try:
                samples.append(decoder.decode(payload))
                keys.append(str(row_id))
            except Exception as exc:  # noqa: BLE001 - a bad negative is skipped, not fatal
                log.warning("setup row %s skipped: %s", row_id, exc)
        order = setup_order(self.spec.seed, keys)
        if not order:
            raise ConfigError(f"no decodable rows in {source.uri} to compute simclr negatives from")
        return [samples[i] for i in order], [keys[i] for i in order]

    # -- 4. the Ray Data pipeline --------------------------------------------------
    def actor_resources(self) -> tuple[tuple[int, int] | int, float, float]:
        from pipelines.ray_runtime import cluster_resources

        cpus, gpus = cluster_resources()
        gpus_per_actor = self.config.gpus_per_actor if self.config.gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
        if self.config.actors:
            low, high = self.config.actors
        elif gpus_per_actor > 0:
            low = high = max(1, int(gpus // gpus_per_actor))
        else:
            low = high = max(1, int(cpus) - 1) if cpus > 2 else max(1, int(cpus))
        # CPU actors leave one CPU to the read, decode and write tasks, or the stream starves
        default_cpus = 1.0 if gpus_per_actor > 0 else max(0.25, (cpus - 1.0) / high)
        cpus_per_actor = self.config.cpus_per_actor if self.config.cpus_per_actor is not None else min(default_cpus, cpus)
        concurrency: tuple[int, int] | int = low if low == high else (low, high)
        return concurrency, gpus_per_actor, cpus_per_actor

    def execute(self, known: dict[str, str] | None, setup_state: Any) -> list[dict[str, Any]]:
        import ray

        config = self.config
        staging = self.output.join(STAGING_DIR, self.run_id)
        self.output.filesystem().create_dir(staging.path, recursive=True)
        columns = list(dict.fromkeys([config.id_column, self.data_column, *config.keep_columns]))
        concurrency, gpus_per_actor, cpus_per_actor = self.actor_resources()
        max_actors = concurrency if isinstance(concurrency, int) else concurrency[1]
        # Ray Data coalesces small reads into one block (override_num_blocks does not split
        # them) and an actor task takes whole blocks: cut the stream into blocks of at least
        # a batch, several per actor (load balance; a lost node costs only its blocks in
        # flight), and at most MAX_ROWS_PER_BLOCK rows (one staged file each).
        rows_per_block = max(config.batch_size, min(MAX_ROWS_PER_BLOCK, -(-self.rows_in // (4 * max_actors))))
        dataset = (
            ray.data.read_parquet([f.path for f in self.input_files], filesystem=self.input.filesystem())
            .select_columns(columns)
            .repartition(target_num_rows_per_block=rows_per_block)
        )
        spec_json = self.spec.to_json()
        decoded = dataset.map_batches(
            stages.decode_batch,
            batch_format="pyarrow",
            num_cpus=0.25,
            fn_kwargs=dict(
                modality=self.spec.modality,
                input_config=self.input_config,
                id_column=config.id_column,
                data_column=self.data_column,
                keep_columns=list(config.keep_columns),
                known_hashes=ray.put(known) if known else None,
            ),
        )
        featurized = decoded.map_batches(
            stages.FeaturizeActor,
            batch_format="pyarrow",
            batch_size=config.batch_size,
            compute=(
                ray.data.ActorPoolStrategy(size=concurrency)
                if isinstance(concurrency, int)
                else ray.data.ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1])
            ),
            num_gpus=gpus_per_actor,
            num_cpus=cpus_per_actor,
            fn_constructor_kwargs=dict(
                spec_json=spec_json,
                setup_state=setup_state if isinstance(setup_state, ray.ObjectRef) or not setup_state else ray.put(setup_state),
                threads=None if gpus_per_actor else max(1, int(round(cpus_per_actor))),
            ),
        )
        written = featurized.map_batches(
            stages.write_batch,
            batch_format="pyarrow",
            batch_size=None,
            num_cpus=0.25,
            fn_kwargs=dict(staging=staging, spec_json=spec_json, spec_hash=self.spec.hash),
        )
        return written.take_all()

    # -- 5. commit -------------------------------------------------------------------
    def commit(self, manifest: Manifest | None, stats: list[dict[str, Any]], setup_artifact: str | None) -> tuple[int, int, int]:
        fs = self.output.filesystem()
        root = self.output.path
        new_files = {row["file"]: row["rows"] for row in stats if row["file"]}
        error_files = {row["error_file"]: row["errors"] for row in stats if row["error_file"]}
        new_ids = _read_ids(fs, list(new_files))
        duplicates = _duplicates(new_ids)
        if duplicates:
            raise RuntimeError(
                f"input ids are not unique ({len(duplicates)} repeated, e.g. {', '.join(duplicates[:5])}); "
                "nothing was committed"
            )
        keep_old: dict[str, int] = dict(manifest.files) if (manifest and self.config.incremental) else {}
        replaced = 0
        if keep_old and new_ids:
            # rows whose content changed are featurized again: drop their old version
            changed = pa.array(sorted(set(new_ids)), pa.string())
            for name in list(keep_old):
                old_path = f"{root}/{name}"
                table = pq.read_table(old_path, filesystem=fs)
                stale = pc.is_in(table.column(stages.ID_COLUMN), value_set=changed)
                count = pc.sum(stale).as_py() or 0
                if count:
                    replaced += count
                    rewritten = f"part-{self.run_id}-{name.removeprefix('part-')}"
                    kept = table.filter(pc.invert(stale))
                    del keep_old[name]
                    if kept.num_rows:
                        pq.write_table(kept, f"{root}/{rewritten}", filesystem=fs)
                        keep_old[rewritten] = kept.num_rows
                    delete_file(fs, old_path)
        committed = dict(keep_old)
        for path, rows in new_files.items():
            name = path.rsplit("/", 1)[-1]
            fs.move(path, f"{root}/{name}")
            committed[name] = rows
        fs.create_dir(f"{root}/{ERRORS_DIR}", recursive=True)
        for info in list_files(fs, f"{root}/{ERRORS_DIR}"):
            delete_file(fs, info.path)
        committed_errors = {}
        for path, rows in error_files.items():
            name = f"{ERRORS_DIR}/{path.rsplit('/', 1)[-1]}"
            fs.move(path, f"{root}/{name}")
            committed_errors[name] = rows
        if exists(fs, self.output.child_path(STAGING_DIR)):  # object stores drop empty prefixes
            fs.delete_dir(self.output.child_path(STAGING_DIR))  # one run per output at a time
        self._manifest = Manifest(
            spec=self.spec.to_dict(),
            spec_hash=self.spec.hash,
            files=committed,
            error_files=committed_errors,
            setup_artifact=setup_artifact,
            runs=list(manifest.runs) if manifest and self.config.incremental else [],
        )
        return sum(new_files.values()), sum(error_files.values()), replaced

    def run(self) -> RunSummary:
        from pipelines.ray_runtime import init_ray

        started = time.time()
        self.validate()
        manifest = self.reconcile_output()
        known = self.known_hashes(manifest)
        init_ray(self.config.address)
        setup_state, setup_artifact = self.setup_state()
        stats = self.execute(known, setup_state)
        self.save_setup(setup_state, setup_artifact)
        rows_in = self.rows_in
        written, failed, replaced = self.commit(manifest, stats, setup_artifact)
        wall = time.time() - started
        first_write_s, steady_rows_per_s = _throughput(stats, started)
        self._manifest.runs.append(
            RunRecord(
                run_id=self.run_id,
                mode="incremental" if self.config.incremental else "full",
                started=datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
                wall_s=round(wall, 3),
                rows_in=rows_in,
                rows_skipped=rows_in - written - failed,
                rows_written=written,
                rows_replaced=replaced,
                rows_failed=failed,
                input_fingerprint=fingerprint(self.input_files),
                first_write_s=first_write_s,
                steady_rows_per_s=steady_rows_per_s,
            )
        )
        fs = self.output.filesystem()
        write_manifest(fs, self.output.path, self._manifest)
        for info in list_files(fs, self.output.path, ".parquet"):
            if info.path.rsplit("/", 1)[-1] not in self._manifest.files:
                delete_file(fs, info.path)  # superseded by this run
        return RunSummary(
            output=self.output.uri,
            spec_hash=self.spec.hash,
            rows_in=rows_in,
            rows_skipped=rows_in - written - failed,
            rows_written=written,
            rows_failed=failed,
            wall_s=wall,
            max_error_fraction=self.config.max_error_fraction,
            first_write_s=first_write_s,
            steady_rows_per_s=steady_rows_per_s,
        )


def _start_setup(spec_json: str, samples: list, keys: list[str], config: FeaturizeConfig) -> Any:
    """Start encoding the negatives on a worker with an actor's accelerator; returns its ObjectRef.

    Without an accelerator the task reserves no CPU and runs torch on every core of its node:
    the actors block on its result while they start, so it has the cores mostly to itself,
    and the read and decode tasks, which need a CPU slot, are not held back by it.
    """
    import ray

    @ray.remote(num_gpus=config.gpus_per_actor or 0, num_cpus=1 if config.gpus_per_actor else 0)
    def encode(spec_json: str, samples: list, keys: list[str]) -> dict:
        import torch

        from fungi_ops import Featurizer, FeaturizerSpec

        featurizer = Featurizer(FeaturizerSpec.from_json(spec_json))
        if featurizer.device.type == "cpu":
            torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        featurizer.setup(samples, keys, batch_size=max(1, config.batch_size // 4))
        return {k: v.numpy() for k, v in featurizer.setup_state().items()}

    return encode.remote(spec_json, samples, keys)


def _throughput(stats: list[dict[str, Any]], started: float) -> tuple[float | None, float | None]:
    """(seconds to the first staged block, rows/s of the blocks staged after it).

    The end-to-end rate of a short run is dominated by start-up; the steady rate is what a
    long nightly run gets, and what scales with actors.
    """
    blocks = sorted((row["written_at"], row["rows"] + row["errors"]) for row in stats if row.get("written_at"))
    if not blocks:
        return None, None
    first = round(blocks[0][0] - started, 3)
    if len(blocks) < 2 or blocks[-1][0] <= blocks[0][0]:
        return first, None
    return first, round(sum(rows for _, rows in blocks[1:]) / (blocks[-1][0] - blocks[0][0]), 3)


def _read_ids(fs: Any, paths: list[str]) -> list[str]:
    if not paths:
        return []
    table = pq.ParquetDataset(paths, filesystem=fs).read(columns=[stages.ID_COLUMN])
    return table.column(0).to_pylist()


def _duplicates(ids: list[str]) -> list[str]:
    counts = pc.value_counts(pa.array(ids, pa.string())) if ids else None
    if counts is None:
        return []
    values = counts.field("values").to_pylist()
    frequencies = counts.field("counts").to_pylist()
    return [v for v, c in zip(values, frequencies) if c > 1]


def run_featurize(config: FeaturizeConfig) -> RunSummary:
    return FeaturizeJob(config).run()
