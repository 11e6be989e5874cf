"""One featurization run: Parquet in (disk or S3) -> FUNGI feature tables out.

Order of work, chosen so that mistakes cost seconds, not GPU hours, and a night costs
what changed, not what exists:

1. validate the settings, list the input (one listing, no file opened) and load the
   model to resolve the spec;
2. take the output's lease (one writer per output), finish a dead run's commit, read the
   committed state;
3. plan the night file by file (:mod:`pipelines.plan`): unchanged input files are
   skipped unopened; read the footers of the files to read and check their schemas;
   check ids for duplicates and moves;
4. compute or reuse the setup artifact (SimCLR negatives, or a dense spec's support index);
5. stream read -> decode (CPU tasks) -> featurize (actor pool) -> stage (tasks);
6. finalize each touched source into one new data file and error file (Ray tasks);
7. commit (:mod:`pipelines.commit`): new sources table, header (the commit point), then
   move in and clean up.

The driver holds O(input files) state; every O(rows) step runs in Ray tasks.

A dense spec (``--objectives dense``, :mod:`fungi_ops.dense`) runs the same steps: its
decoder makes the dense view, its setup state is the support index (from
``--support-from``), its actors run :class:`~fungi_ops.dense.DenseFeaturizer`, and its rows
are written as a dense table (:mod:`fungi_ops.dense_table`); ids, hashes, quarantine,
commit and incremental runs do not tell the two apart.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from fungi_ops.errors import ConfigError
from pipelines import stages
from pipelines.commit import HISTORY_DIR, SETUP_DIR, Committer, recover, staging_area
from pipelines.inputs import InputColumns, InputSchema, check_schemas, read_footers
from pipelines.lease import OutputLease
from pipelines.manifest import Manifest, RunRecord, fingerprint, read_manifest, sources_schema, type_name
from pipelines.plan import IdCheck, NightPlan, check_ids, plan_night
from pipelines.storage import InputFile, Location, delete_tree, exists, list_files, list_input, read_bytes, write_atomic

DEFAULT_DATA_COLUMNS = {"image": "image", "text": "text", "audio": "audio"}
MAX_ROWS_PER_BLOCK = 4096
MAX_BLOCK_BYTES = 128 << 20  # of features: Ray Data's own target block size (a 512-px dense ViT-B row is 6 MiB)
DEFAULT_LEASE_TIMEOUT_S = 600.0


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
    event_time_column: str | None = None
    setup_from: str | None = None
    support_from: str | None = None
    seed: int = 0
    projection_dim: int | None = None
    precision: str = "auto"
    batch_size: int = 16
    actors: tuple[int, int] | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float | None = None
    incremental: bool = False
    overwrite: bool = False
    prune: bool = False
    retry_failed: bool = False
    history: bool = False
    max_error_fraction: float = 0.01
    max_image_pixels: int | None = None  # None: fungi_ops.adapters.DEFAULT_MAX_IMAGE_PIXELS
    lease_timeout: float = DEFAULT_LEASE_TIMEOUT_S
    break_lease: bool = False
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    address: str | None = None
    trust_remote_code: bool = False


@dataclass
class RunSummary:
    """What a run did, for the summary line and the exit code.

    The run fails (exit 1) when an input file could not be read, or when the rows that
    failed for the first time exceed ``max_error_fraction`` of the rows it featurized.
    Rows that failed before with the same content are known failures: not retried unless
    ``--retry-failed``, and never counted against the threshold.
    """

    output: str
    spec_hash: str
    rows_in: int
    rows_skipped: int
    rows_written: int
    rows_failed_new: int
    rows_failed_known: int
    rows_deleted: int
    wall_s: float
    max_error_fraction: float
    files_failed: list[str] = dataclasses.field(default_factory=list)
    first_write_s: float | None = None
    steady_rows_per_s: float | None = None

    @property
    def rows_failed(self) -> int:
        """Rows that failed in this run, new and known."""
        return self.rows_failed_new + self.rows_failed_known

    @property
    def rows_processed(self) -> int:
        """Rows this run featurized or tried to."""
        return self.rows_written + self.rows_failed

    @property
    def failed_fraction(self) -> float:
        """New failures over the rows processed: what the threshold is judged on."""
        return self.rows_failed_new / self.rows_processed if self.rows_processed else 0.0

    @property
    def ok(self) -> bool:
        """Whether the run succeeded (see the class docstring)."""
        return not self.files_failed and self.failed_fraction <= self.max_error_fraction

    def line(self) -> str:
        """The one-line summary the CLI prints."""
        rate = self.rows_processed / self.wall_s if self.wall_s else 0.0
        steady = (
            f" ({self.steady_rows_per_s:.1f} rows/s after the first write at {self.first_write_s:.0f} s)"
            if self.steady_rows_per_s is not None and self.first_write_s is not None
            else ""
        )
        known = f" + {self.rows_failed_known} known" if self.rows_failed_known else ""
        deleted = f", deleted {self.rows_deleted}" if self.rows_deleted else ""
        return (
            f"fungi: rows in {self.rows_in}, skipped {self.rows_skipped}, written {self.rows_written}, "
            f"failed {self.rows_failed_new}{known} ({self.failed_fraction:.1%} new){deleted}, {rate:.1f} rows/s{steady}, "
            f"wall {self.wall_s:.1f} s -> {self.output} (spec {self.spec_hash})"
        )


@dataclass(frozen=True)
class ResolvedSpec:
    """What the driver needs of the resolved feature spec, as plain data.

    The driver never imports torch (about 0.5 GB of resident memory for a CUDA build, plus
    transformers): the model is loaded to resolve the spec in a short-lived child process
    (:class:`SpecResolver`), and the decoder travels to the workers pickled, so that only
    processes that already hold torch unpickle it.
    """

    json: str
    hash: str
    modality: str
    setup_rows: int
    dense: bool  # per-patch features (fungi_ops.dense): a dense table, the support as setup state
    columns: tuple[str, ...]  # the output columns the features take (kept columns must not clash)
    row_bytes: int  # float32 feature bytes of one output row: bounds the stream's block size
    decoder: bytes  # fungi_ops.adapters.make_spec_decoder's decoder, pickled

    @property
    def setup_splits(self) -> bool:
        """Whether the setup state is per-row tensors that concatenate (SimCLR's negatives, not a support index)."""
        return not self.dense

    def to_dict(self) -> dict[str, Any]:
        """The spec as a dictionary (what the manifest records)."""
        return json.loads(self.json)

    @classmethod
    def recorded(cls, manifest: Manifest) -> "ResolvedSpec":
        """The spec an output records, for a night that featurizes nothing (no setup, no decoding)."""
        text = json.dumps(manifest.spec, sort_keys=True, separators=(",", ":"))
        dense = any(o["name"] == "dense" for o in manifest.spec["objectives"])
        return cls(text, manifest.spec_hash, manifest.spec["modality"], 0, dense, (), 0, b"")


def resolve_spec_here(config: FeaturizeConfig) -> ResolvedSpec:
    """Load the model and resolve the run's spec, in this process (imports torch)."""
    from fungi_ops.adapters import DEFAULT_MAX_IMAGE_PIXELS, make_spec_decoder
    from fungi_ops.backbones import load_backbone
    from fungi_ops.featurizer import resolve_spec
    from fungi_ops.spec import FeaturizerSpec, parse_objectives

    spec = FeaturizerSpec(
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
    backbone = load_backbone(
        spec.model, spec.modality, weights=spec.weights, seed=spec.seed, pooling=spec.pooling,
        trust_remote_code=config.trust_remote_code,
    )
    resolved = resolve_spec(spec, backbone)
    columns, patches = tuple(resolved.feature_names), 1
    if resolved.is_dense:
        from fungi_ops.dense import patch_grid
        from fungi_ops.dense_table import GRID_COLUMNS

        columns, patches = (*GRID_COLUMNS, *columns), math.prod(patch_grid(resolved, backbone))
    assert resolved.embed_dim is not None and resolved.projection_dim is not None  # filled by resolve_spec
    row_bytes = 4 * patches * (resolved.embed_dim + resolved.projection_dim * len(resolved.objectives))
    pixels = DEFAULT_MAX_IMAGE_PIXELS if config.max_image_pixels is None else config.max_image_pixels
    decoder = make_spec_decoder(resolved, backbone.input_config, max_image_pixels=pixels)
    return ResolvedSpec(resolved.to_json(), resolved.hash, resolved.modality, resolved.setup_rows, resolved.is_dense,
                        columns, row_bytes, pickle.dumps(decoder))


class SpecResolver:
    """:func:`resolve_spec_here` in a child process, started now and awaited with :meth:`result`.

    The child is a fresh interpreter (``python -m pipelines.job``, the settings as JSON on
    its stdin), so a caller's script is not re-imported there, and the driver can start Ray
    while the child loads the model. A process that holds torch already (a notebook, the
    tests) resolves in place: there it costs no extra memory. A ConfigError of the child
    (unknown model, bad layer, bad objective parameter) is raised by :meth:`result` with its
    message.
    """

    def __init__(self, config: FeaturizeConfig) -> None:
        self.config = config
        self.process = None
        if "torch" not in sys.modules:
            import subprocess

            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pipelines.job"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": path},
            )

    def result(self) -> ResolvedSpec:
        """The resolved spec (waits for the child)."""
        if self.process is None:
            return resolve_spec_here(self.config)
        import base64

        out, err = self.process.communicate(json.dumps(dataclasses.asdict(self.config)))
        lines = out.strip().splitlines()
        answer = json.loads(lines[-1]) if self.process.returncode == 0 and lines else {}
        if "error" in answer:
            raise ConfigError(answer["error"])
        if "spec" not in answer:
            raise RuntimeError(f"resolving the model failed (exit {self.process.returncode}):\n{err[-4000:]}")
        fields = answer["spec"]
        return ResolvedSpec(**{**fields, "columns": tuple(fields["columns"]), "decoder": base64.b64decode(fields["decoder"])})


def spec_settings(config: FeaturizeConfig) -> dict[str, Any]:
    """The settings that determine the spec, as recorded in the manifest.

    A night whose settings equal the recorded ones and that has no input file to read
    reuses the recorded spec instead of loading the model to resolve it again (a local
    weights file counts by size and modification time). Only such a night: any night that
    featurizes resolves the spec from the model and refuses a different one.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        library = version("fungi")
    except PackageNotFoundError:
        library = None
    settings: dict[str, Any] = {
        name: getattr(config, name)
        for name in ("model", "modality", "weights", "target_layer", "pooling", "objectives", "seed", "projection_dim",
                     "precision", "trust_remote_code")
    }
    if config.weights and os.path.isfile(config.weights):
        stat = os.stat(config.weights)
        settings["weights_file"] = [stat.st_size, stat.st_mtime_ns]
    settings["fungi"] = library
    return settings


def _resolve_child() -> None:
    """Entry point of :class:`SpecResolver`'s child: settings on stdin, one JSON line out."""
    import base64

    settings = json.loads(sys.stdin.read())
    settings["keep_columns"] = tuple(settings["keep_columns"])
    settings["actors"] = tuple(settings["actors"]) if settings["actors"] else None
    try:
        resolved = resolve_spec_here(FeaturizeConfig(**settings))
    except ConfigError as exc:
        print(json.dumps({"error": str(exc)}))
        return
    fields = {**dataclasses.asdict(resolved), "decoder": base64.b64encode(resolved.decoder).decode()}
    print(json.dumps({"spec": fields}))


def list_parquet(location: Location, what: str) -> list[InputFile]:
    """The Parquet data files of an input; ConfigError when there is none."""
    fs = location.filesystem()
    if not exists(fs, location.path):
        raise ConfigError(f"{what} {location.uri} does not exist")
    files = list_input(location)
    if not files:
        raise ConfigError(f"{what} {location.uri} holds no Parquet files")
    return files


class FeaturizeJob:
    """A configured run; :meth:`run` executes it and returns the summary."""

    def __init__(self, config: FeaturizeConfig) -> None:
        self.config = config
        self.data_column = config.data_column or DEFAULT_DATA_COLUMNS.get(config.modality, "data")
        self.columns = InputColumns(config.id_column, self.data_column, tuple(config.keep_columns), config.event_time_column)
        self.input = Location(config.input, config.storage_options)
        self.output = Location(config.output, config.storage_options)
        self.run_id = "r" + uuid.uuid4().hex[:12]
        self.staging = staging_area(self.output, self.run_id)
        self.started = time.time()
        self.setup_draw: tuple[Any, Any, str] | None = None  # ObjectRefs of the draw's order and skipped rows, source

    # -- 1. settings ----------------------------------------------------------------------
    def validate_settings(self) -> None:
        """Checks that need neither data nor model; ConfigError names the flag."""
        config = self.config
        if not 0 <= config.max_error_fraction <= 1:
            raise ConfigError("--max-error-fraction must be within [0, 1]")
        if config.batch_size < 1:
            raise ConfigError("--batch-size must be >= 1")
        if config.max_image_pixels is not None and config.max_image_pixels < 1:
            raise ConfigError("--max-image-pixels must be >= 1")
        if config.incremental and config.overwrite:
            raise ConfigError("--incremental and --overwrite contradict each other")
        if (config.prune or config.retry_failed) and not config.incremental:
            raise ConfigError("--prune and --retry-failed apply to --incremental runs")
        reserved = {stages.ID_COLUMN, stages.HASH_COLUMN, stages.TIME_COLUMN}  # the features': validate_spec
        clash = sorted(c for c in config.keep_columns if c in reserved or c.startswith("__fungi"))
        if clash:
            raise ConfigError(f"--keep-columns {', '.join(clash)} would clash with output columns")
        if config.setup_from and config.support_from and config.setup_from != config.support_from:
            raise ConfigError("--setup-from and --support-from name the same data (the setup rows); give one")
        if self.input.overlaps(self.output):
            raise ConfigError(
                f"--output {self.output.uri} and --input {self.input.uri} overlap (one is the other or inside it): "
                "the output would be read back as input or the input deleted; use a separate output"
            )
        info = self.output.filesystem().get_file_info(self.output.path)
        if info.type.name == "File":
            raise ConfigError(f"--output {self.output.uri} is a file; it must be a directory (existing or not)")

    # -- 2. output state ------------------------------------------------------------------
    def recorded_spec(self, listing: list[InputFile]) -> ResolvedSpec | None:
        """The output's recorded spec when this night can do without the model, else None.

        Read without the lease (the lease holder re-reads everything): an incremental night
        with the recorded settings and no input file to read loads no model and, unless it
        prunes or moves rows, starts no Ray.
        """
        if not self.config.incremental:
            return None
        try:
            manifest = read_manifest(self.output)
        except Exception:  # noqa: BLE001 - unreadable now: the full path reports it properly
            return None
        if manifest is None or manifest.pending or manifest.input.get("spec_settings") != spec_settings(self.config):
            return None
        plan = plan_night(listing, manifest, incremental=True, prune=self.config.prune, retry_failed=self.config.retry_failed)
        return None if plan.to_read else ResolvedSpec.recorded(manifest)

    def reconcile(self, manifest: Manifest | None) -> Manifest | None:
        """The committed state this run builds on (None: start afresh), or refuse."""
        if self.config.overwrite:
            return None
        if manifest is None:
            if list_files(self.output.filesystem(), self.output.path, ".parquet"):
                raise ConfigError(
                    f"output {self.output.uri} holds Parquet files but no fungi manifest; "
                    "refusing to mix with them (use --overwrite to replace)"
                )
            return None
        if manifest.spec_hash != self.spec.hash:
            raise ConfigError(
                f"output {self.output.uri} holds features of spec {manifest.spec_hash} "
                f"(model {manifest.spec.get('model')}); this run is spec {self.spec.hash}. "
                "Use another output, or --overwrite to replace it"
            )
        recorded = {k: manifest.input.get(k) for k in ("id_column", "data_column", "keep_columns", "event_time_column")}
        wanted = self.input_settings(None)
        changed = [k for k in recorded if recorded[k] != wanted[k]]
        if self.config.incremental and changed:
            raise ConfigError(
                f"output {self.output.uri} was written with "
                + ", ".join(f"{k.replace('_', '-')} {recorded[k]!r}" for k in changed)
                + "; this run asks for " + ", ".join(f"{wanted[k]!r}" for k in changed)
                + ". An incremental run must keep them; use --overwrite to rebuild"
            )
        return manifest

    def validate_spec(self) -> None:
        """Checks of the settings against the resolved spec (before the lease: a mistake writes nothing)."""
        clash = sorted(set(self.config.keep_columns) & set(self.spec.columns))
        if clash:
            raise ConfigError(f"--keep-columns {', '.join(clash)} would clash with output columns")
        if self.config.support_from and not self.spec.dense:
            raise ConfigError(
                "--support-from is the dense objective's support index; this spec has none "
                "(--setup-from gives SimCLR's negatives)"
            )

    def input_settings(self, schema: InputSchema | None) -> dict[str, Any]:
        """The input settings recorded in the manifest (an incremental run must keep them)."""
        settings: dict[str, Any] = {
            "uri": self.input.uri,
            "id_column": self.columns.id,
            "data_column": self.columns.data,
            "keep_columns": list(self.columns.keep),
            "event_time_column": self.columns.event_time,
            "spec_settings": spec_settings(self.config),
        }
        if schema is not None:
            settings["id_type"] = type_name(schema.type_of(self.columns.id))
            settings["types"] = {name: str(schema.type_of(name)) for name in self.columns.names}
        return settings

    # -- 4. setup artifact ----------------------------------------------------------------
    def setup_state(self, previous: Manifest | None) -> tuple[Any, str | None]:
        """The setup state for this spec: the output's own, or a Ray task computing it.

        An incremental night keeps the state its output was featurized with (the features
        of a spec must not change from night to night, even if the training split did);
        another run computes it afresh under a name of its own, committed with it.

        A fresh state is returned as the ``ObjectRef`` of a Ray task and saved by
        :meth:`save_setup` once the stream has run: the actors take the reference, so their
        start (worker processes, model loading) and the read and decode stages overlap the
        selection, decoding and encoding of the setup rows instead of waiting for them.
        """
        count = self.spec.setup_rows
        if not count:
            return None, None
        fs = self.output.filesystem()
        if self.config.incremental and previous is not None and previous.setup_artifact:
            from safetensors.numpy import load

            return load(read_bytes(fs, self.output.child_path(previous.setup_artifact))), previous.setup_artifact
        chosen = self.config.support_from or self.config.setup_from
        source = Location(chosen, self.config.storage_options) if chosen else self.input
        if not chosen:
            flag = "--support-from" if self.spec.dense else "--setup-from"
            print(f"fungi: {self.setup_data} drawn from the input (pass {flag} to use a training split)")
        files = list_parquet(source, "setup data")
        setup_columns = InputColumns(self.columns.id, self.columns.data)
        check_schemas(source, files, read_footers(source, files), setup_columns, self.spec.modality)
        return _start_setup(self, source, [f.path for f in files], count), f"{SETUP_DIR}/{self.spec.hash}-{self.run_id}.safetensors"

    def check_setup_draw(self) -> None:
        """ConfigError (exit 2) when no setup row decodes; waits for the draw started by :meth:`setup_state`.

        Rows that do not decode are reported here, on the driver, in one line (the task
        that found them logs nothing: Ray would forward one stderr line per row).
        """
        import ray

        if self.setup_draw is None:
            return
        order_ref, skipped_ref, source = self.setup_draw
        order, skipped = ray.get([order_ref, skipped_ref])
        examples = "; ".join(skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
        if not order:
            raise ConfigError(
                f"no decodable rows in {source} to compute the setup state ({self.setup_data}) from: "
                f"{len(skipped)} drawn, e.g. {examples}"
            )
        if skipped:
            print(f"fungi: {len(skipped)} of {len(skipped) + len(order)} rows drawn for {self.setup_data} "
                  f"do not decode and are left out: {examples}")

    @property
    def setup_data(self) -> str:
        """What the setup rows are for, in messages."""
        return "the dense support" if self.spec.dense else "simclr negatives"

    def save_setup(self, state: Any, relative: str | None) -> None:
        """Write a freshly computed setup state beside the output (a loaded one is already there)."""
        import ray
        from safetensors.numpy import save

        if not isinstance(state, ray.ObjectRef):
            return
        blob = save(ray.get(state), metadata={"fungi.spec_hash": self.spec.hash})
        fs = self.output.filesystem()
        fs.create_dir(self.output.child_path(SETUP_DIR), recursive=True)
        write_atomic(fs, self.output.child_path(relative), blob)

    # -- 5. the Ray Data pipeline ---------------------------------------------------------
    def actor_resources(self) -> tuple[tuple[int, int] | int, float, float]:
        """(pool size, GPUs per actor, CPUs per actor) from the settings and the cluster."""
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

    def execute(self, plan: NightPlan, schema: InputSchema, rows_to_read: int, setup_state: Any) -> list[dict[str, Any]]:
        """Stream the sources to read through decode, featurize and staging; one stats row per staged block."""
        import ray

        reads = plan.to_read
        if not reads:
            return []
        config = self.config
        concurrency, gpus_per_actor, cpus_per_actor = self.actor_resources()
        max_actors = concurrency if isinstance(concurrency, int) else concurrency[1]
        rows_per_block = block_rows(rows_to_read, max_actors, config.batch_size, self.spec.row_bytes)
        items = [
            {
                "source": work.source,
                "path": work.input.path,
                "old_file": work.old["file"] if work.old else None,
                "old_error_file": work.old["error_file"] if work.old else None,
            }
            for work in reads
        ]
        spec_json = self.spec.json
        read = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            stages.read_sources,
            batch_format="pyarrow",
            batch_size=1,
            num_cpus=0.25,
            fn_kwargs=dict(
                input_location=self.input, output=self.output, columns=self.columns, schema=schema,
                event_time=datetime.fromtimestamp(self.started, timezone.utc),
                rows_per_block=rows_per_block, retry_failed=config.retry_failed,
            ),
        ).repartition(target_num_rows_per_block=rows_per_block)
        decoded = read.map_batches(
            stages.decode_batch,
            batch_format="pyarrow",
            num_cpus=0.25,
            fn_kwargs=dict(modality=self.spec.modality, decoder=self.spec.decoder),
        )
        # CPU actors take one block at a time, so that a small job's few blocks spread over
        # every actor instead of queueing at the first one to start (measured: 2 actors, 2
        # blocks, one actor took both); GPU actors keep Ray Data's default, which prefetches
        sizes = {"size": concurrency} if isinstance(concurrency, int) else {"min_size": concurrency[0], "max_size": concurrency[1]}
        in_flight = None if gpus_per_actor else 1
        featurized = decoded.map_batches(
            stages.FeaturizeActor,
            batch_format="pyarrow",
            batch_size=min(config.batch_size, rows_per_block),
            compute=ray.data.ActorPoolStrategy(**sizes, max_tasks_in_flight_per_actor=in_flight),
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
            fn_kwargs=dict(staging=self.staging, spec_json=spec_json, spec_hash=self.spec.hash, dense=self.spec.dense),
        )
        return written.take_all()

    # -- 6. finalize ----------------------------------------------------------------------
    def finalize(self, plan: NightPlan, stats: list[dict[str, Any]], input_rows: dict[str, int]) -> list[dict[str, Any]]:
        """One Ray task per touched source: its new files in staging and its new sources-table row."""
        import ray

        staged: dict[str, tuple[set[str], set[str]]] = {}
        for row in stats:
            files, error_files = staged.setdefault(row["source"], (set(), set()))
            if row["file"]:
                files.add(row["file"])
            if row["error_file"]:
                error_files.add(row["error_file"])
        task = ray.remote(num_cpus=0.25)(stages.finalize_source)
        metadata = stages.spec_metadata(self.spec.json, self.spec.hash)
        refs = []
        for work in plan.work.values():
            files, error_files = staged.get(work.source, (set(), set()))
            description = {
                "source": work.source,
                "kind": work.kind,
                "old": work.old,
                "input": {"size": work.input.size, "identity": work.input.identity} if work.input else None,
                "input_path": work.input.path if work.input else None,
                "input_rows": input_rows.get(work.source),
                "listed": work.source in plan.listed,
                "reads_payloads": work.reads_payloads,
                "staged_files": sorted(files),
                "staged_error_files": sorted(error_files),
                "moved_ids": work.moved_ids,
            }
            refs.append(task.remote(
                description, input_location=self.input, output=self.output, staging=self.staging,
                id_column=self.columns.id, id_type=self.id_type, run_id=self.run_id, prune=self.config.prune,
                metadata=metadata, dense=self.spec.dense,
            ))
        return ray.get(refs)

    # -- 7. commit ------------------------------------------------------------------------
    def next_manifest(self, previous: Manifest | None, plan: NightPlan, results: list[dict[str, Any]],
                      schema: InputSchema) -> Manifest:
        """The state after this run: untouched sources as they were, touched ones as finalized."""
        rows = dict(plan.committed)
        for row in plan.dropped:
            rows.pop(row["source"], None)
        for source in plan.absent:
            rows[source] = {**rows[source], "present": False}
        for result in results:
            if result["row"] is not None:
                rows[result["row"]["source"]] = result["row"]
        table = pa.Table.from_pylist(sorted(rows.values(), key=lambda r: r["source"]), schema=sources_schema(self.id_type))
        return Manifest(
            spec=self.spec.to_dict(),
            spec_hash=self.spec.hash,
            input=self.input_settings(schema),
            sources=table,
            version=previous.version if previous else 0,
            setup_artifact=self.setup_artifact,
            history=HISTORY_DIR if self.config.history else (previous.history if previous else None),
            runs=list(previous.runs) if previous else [],
        )

    def run(self) -> RunSummary:
        """Execute the run (see the module docstring)."""
        from pipelines.ray_runtime import init_ray

        config = self.config
        self.validate_settings()
        listing = list_parquet(self.input, "input")
        recorded = self.recorded_spec(listing)
        resolving = None if recorded else SpecResolver(config)
        if resolving:
            init_ray(config.address)  # while the child loads the model
        self.spec = resolving.result() if resolving else recorded
        self.validate_spec()
        with OutputLease(self.output, self.run_id, timeout_s=config.lease_timeout, break_lease=config.break_lease) as lease:
            previous = self.reconcile(recover(self.output, self.run_id, tolerate_unreadable=config.overwrite))
            plan = plan_night(
                listing, previous, incremental=config.incremental, prune=config.prune, retry_failed=config.retry_failed
            )
            if plan.to_read and not self.spec.decoder:  # the output changed since it was peeked at
                self.spec = SpecResolver(config).result()
                self.validate_spec()
                previous = self.reconcile(previous)
            reads = plan.to_read
            read_files = [work.input for work in reads]
            footers = read_footers(self.input, read_files)
            recorded_id_type = previous.id_type if previous else None
            if read_files:
                schema = check_schemas(self.input, read_files, footers, self.columns, config.modality, recorded_id_type)
            elif previous is not None:
                schema = InputSchema(pa.schema([(n, _type(t)) for n, t in previous.input["types"].items()]))
            else:
                raise ConfigError(f"input {self.input.uri} holds no Parquet files")
            self.id_type = schema.type_of(self.columns.id)
            input_rows = {f.relpath: footer.num_rows for f, footer in zip(read_files, footers)}
            if plan.work:
                init_ray(config.address)
            committer = Committer(self.output)
            try:
                setup_state, self.setup_artifact = (  # drawn and encoded while the ids are checked
                    self.setup_state(previous) if reads else (None, previous.setup_artifact if previous else None)
                )
                id_check = check_ids(
                    plan, input_location=self.input, output=self.output, scratch=self.staging.join("ids"),
                    id_column=self.columns.id, id_type=self.id_type, input_rows=input_rows,
                )
                self.check_setup_draw()
                reads = plan.to_read
                stats = self.execute(plan, schema, sum(input_rows[w.source] for w in reads), setup_state)
                self.save_setup(setup_state, self.setup_artifact)
                results = self.finalize(plan, stats, input_rows)
                manifest = self.next_manifest(previous, plan, results, schema)
                summary, record = self.summarize(manifest, plan, results, stats, listing, id_check)
                manifest.runs.append(record)
                lease.check()
                committer.commit(manifest, previous, self.run_id, overwrite=config.overwrite)
            except Exception:
                if not committer.operations[1:]:  # before the commit point: nothing of this run may stay
                    delete_tree(self.output.filesystem(), self.staging.path)
                raise
        return summary

    def summarize(self, manifest: Manifest, plan: NightPlan, results: list[dict[str, Any]], stats: list[dict[str, Any]],
                  listing: list[InputFile], id_check: IdCheck) -> tuple[RunSummary, RunRecord]:
        """The run's summary line and its record in the manifest."""
        totals: dict[str, int] = {}
        for result in results:
            for key, value in result["counts"].items():
                totals[key] = totals.get(key, 0) + value
        failed_files = [*id_check.failed.values(), *(r["failed"] for r in results if r["failed"])]
        dropped_rows = sum(row["rows"] + row["errors"] for row in plan.dropped)
        present = pc.filter(manifest.sources, manifest.sources.column("present"))
        rows_in = int(pc.sum(present.column("input_rows")).as_py() or 0)
        processed = totals.get("written", 0) + totals.get("failed_new", 0) + totals.get("failed_known", 0)
        wall = time.time() - self.started
        first_write_s, steady = _throughput(stats, self.started)
        summary = RunSummary(
            output=self.output.uri, spec_hash=self.spec.hash, rows_in=rows_in, rows_skipped=max(0, rows_in - processed),
            rows_written=totals.get("written", 0), rows_failed_new=totals.get("failed_new", 0),
            rows_failed_known=totals.get("failed_known", 0), rows_deleted=totals.get("deleted", 0) + dropped_rows,
            wall_s=wall, max_error_fraction=self.config.max_error_fraction, files_failed=failed_files,
            first_write_s=first_write_s, steady_rows_per_s=steady,
        )
        record = RunRecord(
            run_id=self.run_id,
            mode="incremental" if self.config.incremental else ("overwrite" if self.config.overwrite else "full"),
            started=datetime.fromtimestamp(self.started, timezone.utc).isoformat(timespec="seconds"),
            wall_s=round(wall, 3),
            rows_in=rows_in,
            rows_skipped=summary.rows_skipped,
            rows_written=summary.rows_written,
            rows_replaced=totals.get("replaced", 0),
            rows_failed=summary.rows_failed,
            rows_failed_new=summary.rows_failed_new,
            rows_failed_known=summary.rows_failed_known,
            rows_removed_failed=totals.get("removed_failed", 0),
            rows_deleted=summary.rows_deleted,
            rows_moved=totals.get("moved", 0),
            files_read=len(plan.to_read) + len(id_check.failed),
            files_unchanged=len(plan.unchanged),
            files_failed=failed_files,
            output_files_opened=len(id_check.opened.union(*(r["opened"] for r in results))),
            output_files_written=totals.get("rewritten", 0),
            input_fingerprint=fingerprint(listing),
            first_write_s=first_write_s,
            steady_rows_per_s=steady,
        )
        return summary, record


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


def _type(name: str) -> pa.DataType:
    from pipelines.manifest import _parse_type

    return _parse_type(name)


def _start_setup(job: FeaturizeJob, source: Location, paths: list[str], count: int) -> Any:
    """Draw and decode the setup rows (a Ray task, waited for), then start encoding them.

    Returns the ObjectRef of the setup state. On CPUs the rows are encoded in as many parts
    as there are CPU actors, one task each with its share of the cores (measured on 2 cores:
    64 negatives x 49 views in 56.8 s as 2 one-thread tasks, 67.1 s as one two-thread task),
    cut at encoding-chunk boundaries so that the state is bit-identical to one task's. The
    tasks reserve no CPU: the actors wait for their result while they start, so they have
    the cores mostly to themselves, and the read and decode tasks are not held back. With
    accelerators one task encodes everything on an actor's accelerator.
    """
    import ray

    concurrency, gpus, _ = job.actor_resources()
    parts = 1 if gpus or not job.spec.setup_splits else (concurrency if isinstance(concurrency, int) else concurrency[1])
    chunk = max(1, job.config.batch_size // 4)
    select = ray.remote(num_cpus=0.25, num_returns=parts + 2)(select_setup_rows)
    refs = select.remote(job.spec.json, job.spec.decoder, source, paths, job.columns.id, job.columns.data, count, parts, chunk)
    order_ref, skipped_ref, part_refs = refs[0], refs[1], refs[2:]
    job.setup_draw = (order_ref, skipped_ref, source.uri)  # checked by FeaturizeJob.check_setup_draw before the stream
    cores = int(ray.cluster_resources().get("CPU", 1))
    encode = ray.remote(num_gpus=gpus, num_cpus=1 if gpus else 0)(encode_setup_rows)
    threads = None if gpus else max(1, cores // parts)
    encoded = [encode.remote(job.spec.json, part, chunk, threads) for part in part_refs]
    if not job.spec.setup_splits:  # one part, in draw order: images keep it (a dense support is no row table)
        return encoded[0]
    return ray.remote(num_cpus=0)(merge_setup_parts).remote(order_ref, *encoded)


def select_setup_rows(spec_json: str, decoder: bytes, source: Location, paths: list[str], id_column: str,
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
    dataset = pads.dataset(paths, filesystem=source.filesystem(), format="parquet")
    ids = [str(v) for v in dataset.to_table(columns=[id_column]).column(0).to_pylist() if v is not None]
    chosen = [ids[i] for i in setup_order(spec.seed, ids)[:count]]
    id_type = dataset.schema.field(id_column).type
    table = dataset.to_table(columns=[id_column, data_column], filter=pc.field(id_column).isin(pa.array(chosen).cast(id_type)))
    decode = pickle.loads(decoder).decode
    samples, keys, skipped = [], [], []
    for row_id, payload in zip(table.column(0).to_pylist(), table.column(1).to_pylist()):
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


def run_featurize(config: FeaturizeConfig) -> RunSummary:
    """Run one featurization job with ``config`` and return its summary."""
    return FeaturizeJob(config).run()


if __name__ == "__main__":
    _resolve_child()
