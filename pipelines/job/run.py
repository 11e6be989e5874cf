"""One featurization run (:func:`run_featurize`): Parquet or a lake table in (disk or S3) -> FUNGI features out.

Order of work, chosen so that mistakes cost seconds, not GPU hours, and a night costs
what changed, not what exists. Each step lives in a module of its own:

1. the settings (:mod:`pipelines.config`), the input listing (:mod:`pipelines.formats.sources`:
   one listing, no file opened) and the feature spec, resolved from the model in a child
   process while Ray starts (:mod:`pipelines.job.spec_resolution`);
2. the output (:mod:`pipelines.formats`: a Parquet folder, a Delta table or an Iceberg
   table, behind one interface): take its lease (:mod:`pipelines.lease`, one writer per
   output), finish or undo what a dead run left, read the committed state;
3. plan the night file by file (:mod:`pipelines.job.plan`): unchanged input files are skipped
   unopened; read the footers of the files to read and check their schemas
   (:mod:`pipelines.inputs`); check ids for duplicates and moves;
4. compute or reuse the setup state (:mod:`pipelines.job.setup_rows`: SimCLR negatives, or a
   dense spec's support index);
5. stream read -> decode -> featurize (actor pool) -> stage, then finalize each touched
   source into one new data file and error file (:mod:`pipelines.job.stream`, and the
   stages of :mod:`pipelines.job`);
6. commit through the output's format (one atomic step every reader sees whole), and
   summarize (:mod:`pipelines.job.summary`).

The driver holds O(input files) state; every O(rows) step runs in Ray tasks, or, for a
job of at most ``--in-process-rows`` rows to featurize, the same functions run in the
driver's own process (:mod:`pipelines.tasks`).

A dense spec (``--objectives dense``, :mod:`fungi_ops.dense`) runs the same steps: its
decoder makes the dense view, its setup state is the support index (from
``--support-from``), its actors run :class:`~fungi_ops.dense.DenseFeaturizer`, and its rows
are written as a dense table (:mod:`fungi_ops.dense_table`); ids, hashes, quarantine,
commit and incremental runs do not tell the two apart.
"""
from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import pyarrow as pa

from fungi_ops.errors import ConfigError, FungiError
from pipelines.config import SMALL_INPUT_BYTES, FeaturizeConfig, runs_in_process, spec_settings
from pipelines.formats import open_output
from pipelines.formats.base import NothingToCommit
from pipelines.formats.folder import history_location, history_name
from pipelines.formats.sources import InputListing, file_schemas, input_location, list_sources, live_row_counts
from pipelines.inputs import InputColumns, InputSchema, check_schemas, read_footers
from pipelines.interrupts import NOTHING_COMMITTED, Interrupted
from pipelines.lease import LeaseLost, OutputLease
from pipelines.manifest import Manifest, parse_type, sources_schema, type_name
from pipelines.job.plan import NightPlan, check_ids, plan_night
from pipelines.job.setup_rows import SetupStage
from pipelines.job.spec_resolution import ResolvedSpec, SpecResolver, spec_differences
from pipelines.job.finalize import unreadable_source_row
from pipelines.layout import STAGING_DIR, spec_metadata
from pipelines.storage import (
    InputFile, StorageFailure, delete_empty_dir, delete_tree, describe_storage_error, storage_cause,
)
from pipelines.job.stream import Stream
from pipelines.job.summary import RunIdentity, RunSummary, summarize
from pipelines.tasks import InProcessTasks, RayTasks, Tasks

log = logging.getLogger(__name__)


class FeaturizeJob:
    """A configured run; :meth:`run` executes it and returns the summary."""

    def __init__(self, config: FeaturizeConfig) -> None:
        self.config = config
        self.columns = InputColumns(config.id_column, config.data_column_name, tuple(config.keep_columns),
                                    config.event_time_column)
        self.input = input_location(config.input, config.storage_options)  # None until listed: an Iceberg table's
        self.listing: InputListing | None = None  # the input's sources (and table version), listed by run()
        self.unreadable: dict[str, str] = {}  # input files whose footer does not read: they fail alone
        self.table = open_output(config.output, config.storage_options, catalog=config.catalog)
        self.output = self.table.root
        self.run_id = "r" + uuid.uuid4().hex[:12]
        self.staging = self.table.staging_area(self.run_id)
        self.started = time.time()

    # -- 1. settings and spec -------------------------------------------------------------
    def validate_settings(self) -> None:
        """Checks that need neither data nor model; ConfigError names the flag."""
        self.config.validate()
        if self.config.history and self.table.versioned_names:
            raise ConfigError(
                f"--history keeps row versions of a Parquet folder; {self.table.uri} is a {self.table.kind} table, "
                "whose versions are kept by the table itself (fungi eval --version, time travel)"
            )
        info = self.output.filesystem().get_file_info(self.output.path)
        if info.type.name == "File":
            raise ConfigError(f"--output {self.table.uri} is a file; it must be a directory (existing or not)")
        if self.input is not None:
            self.check_overlap()

    def check_overlap(self) -> None:
        """ConfigError when the input and the output folders overlap (an Iceberg input: once listed)."""
        if self.input.overlaps(self.output):
            raise ConfigError(
                f"--output {self.table.uri} and --input {self.input.uri} overlap (one is the other or inside it): "
                "the output would be read back as input or the input deleted; use a separate output"
            )
        if self.config.history and self.input.overlaps(history_location(self.output)):
            raise ConfigError(f"--input {self.input.uri} overlaps the output's history folder "
                              f"{history_location(self.output).uri}; use a separate output")

    def recorded_spec(self, listing: list[InputFile]) -> ResolvedSpec | None:
        """The output's recorded spec when this night can do without the model, else None.

        Read without the lease (the lease holder re-reads everything): an incremental night
        with the recorded settings and no input file to read loads no model and, unless it
        prunes or moves rows, starts no Ray.
        """
        if not self.config.incremental:
            return None
        try:
            manifest = self.table.read_manifest()
        except Exception:  # noqa: BLE001 - unreadable now: the full path reports it properly
            return None
        if manifest is None or manifest.pending or manifest.input.get("spec_settings") != spec_settings(self.config):
            return None
        plan = plan_night(listing, manifest, incremental=True, prune=self.config.prune, retry_failed=self.config.retry_failed)
        return None if plan.to_read else ResolvedSpec.recorded(manifest)

    def validate_spec(self) -> None:
        """Checks of the settings against the resolved spec (before the lease: a mistake writes nothing)."""
        clash = sorted(set(self.config.keep_columns) & set(self.spec.columns))
        if clash:
            raise ConfigError(f"--keep-columns {', '.join(clash)} would clash with output columns")
        if self.spec.dense and self.table.list_vectors:
            raise ConfigError(
                f"--objectives dense writes per-patch features, which {self.table.kind} tables cannot hold as vectors "
                "(no fixed-size lists): featurize a dense spec into a Parquet folder"
            )
        if self.config.support_from and not self.spec.dense:
            raise ConfigError(
                "--support-from is the dense objective's support index; this spec has none "
                "(--setup-from gives SimCLR's negatives)"
            )

    # -- 2. output state ------------------------------------------------------------------
    def reconcile(self, manifest: Manifest | None) -> Manifest | None:
        """The committed state this run builds on (None: start afresh), or refuse."""
        if self.config.overwrite:
            return None
        if manifest is None:
            if self.table.holds_foreign_data():
                raise ConfigError(
                    f"output {self.table.uri} holds data that fungi did not write (no fungi manifest); "
                    "refusing to mix with it (use --overwrite to replace)"
                )
            return None
        if manifest.spec_hash != self.spec.hash:
            written, current = manifest.spec.get("format"), self.spec.to_dict().get("format")
            if written != current:  # no setting brings the old features back: only a rebuild does
                raise ConfigError(
                    f"output {self.table.uri} holds features of spec {manifest.spec_hash} (model "
                    f"{manifest.spec.get('model')}) (spec format {written}, whose features this fungi's format "
                    f"{current} computes otherwise); this run is spec {self.spec.hash}. Use another output, or "
                    "--overwrite to replace it"
                )
            differences = spec_differences(manifest.spec, self.spec.to_dict())
            raise ConfigError(
                f"output {self.table.uri} holds features of spec {manifest.spec_hash}; this run is spec "
                f"{self.spec.hash}: {', '.join(differences)}. Run with the output's settings, or --overwrite to "
                "replace its features, or write to another --output"
            )
        recorded = {k: manifest.input.get(k) for k in ("id_column", "data_column", "keep_columns", "event_time_column")}
        wanted = self.input_settings(None)
        changed = [k for k in recorded if recorded[k] != wanted[k]]
        if self.config.incremental and changed:
            raise ConfigError(
                f"output {self.table.uri} was written with "
                + ", ".join(f"{k.replace('_', '-')} {recorded[k]!r}" for k in changed)
                + "; this run asks for " + ", ".join(f"{wanted[k]!r}" for k in changed)
                + ". An incremental run must keep them; use --overwrite to rebuild"
            )
        return manifest

    def input_settings(self, schema: InputSchema | None) -> dict[str, Any]:
        """The input settings recorded in the manifest (an incremental run must keep them)."""
        settings: dict[str, Any] = {
            "uri": self.input.uri,
            "id_column": self.columns.id,
            "data_column": self.columns.data,
            "keep_columns": list(self.columns.keep),
            "event_time_column": self.columns.event_time,
            "spec_settings": spec_settings(self.config),
            **(self.listing.settings() if self.listing else {}),
        }
        if schema is not None:
            settings["id_type"] = type_name(schema.type_of(self.columns.id))
            settings["types"] = {name: str(schema.type_of(name)) for name in self.columns.names}
        return settings

    # -- 3. the night's input -------------------------------------------------------------
    def read_schema(self, plan: NightPlan, previous: Manifest | None) -> tuple[InputSchema, dict[str, int]]:
        """The input schema (checked in every footer read, or a table's) and each file's row count in its footer.

        A file whose footer cannot be read (0 bytes, truncated) leaves the night's work and fails alone
        (:attr:`unreadable`, reported as the files that fail to read are), unless no file is left to read.
        """
        read_files = [work.input for work in plan.to_read]
        footers = read_footers(self.input, read_files, self.unreadable)
        if self.unreadable and len(self.unreadable) == len(read_files) and previous is None:
            raise ConfigError(f"{next(iter(self.unreadable.values()))}; no input file could be read: fix or remove it")
        for source in self.unreadable:
            del plan.work[source]  # not committed this night; its previous output stays as it was
        read_files, footers = [f for f in read_files if f.relpath not in self.unreadable], [f for f in footers if f]
        if read_files:
            recorded_id_type = previous.id_type if previous else None
            schemas = file_schemas(self.listing, footers)
            schema = check_schemas(self.input, read_files, schemas, self.columns, self.config.modality, recorded_id_type)
        elif previous is not None:
            schema = InputSchema(pa.schema([(n, parse_type(t)) for n, t in previous.input["types"].items()]))
        else:
            raise ConfigError(f"input {self.input.uri} holds no Parquet files")
        return schema, {f.relpath: footer.num_rows for f, footer in zip(read_files, footers)}

    # -- 6. the next state ----------------------------------------------------------------
    def next_manifest(self, previous: Manifest | None, plan: NightPlan, results: list[dict[str, Any]],
                      schema: InputSchema, setup_artifact: str | None) -> Manifest:
        """The state after this run: untouched sources as they were, touched ones as finalized."""
        rows = dict(plan.committed)
        for row in plan.dropped:
            rows.pop(row["source"], None)
        for source in plan.absent:
            rows[source] = {**rows[source], "present": False}
        for result in results:
            if result["row"] is not None:
                rows[result["row"]["source"]] = result["row"]
        id_type = schema.type_of(self.columns.id)
        table = pa.Table.from_pylist(sorted(rows.values(), key=lambda r: r["source"]), schema=sources_schema(id_type))
        return Manifest(
            spec=self.spec.to_dict(),
            spec_hash=self.spec.hash,
            input=self.input_settings(schema),
            sources=table,
            version=previous.version if previous else 0,
            setup_artifact=setup_artifact,
            history=history_name(self.output) if self.config.history else (previous.history if previous else None),
            runs=list(previous.runs) if previous else [],
        )

    @property
    def identity(self) -> RunIdentity:
        """This run, for its summary and record."""
        config = self.config
        mode = "incremental" if config.incremental else ("overwrite" if config.overwrite else "full")
        return RunIdentity(self.run_id, self.started, mode, self.table.uri, self.spec.hash, config.max_error_fraction)

    # -- the run --------------------------------------------------------------------------
    def run(self) -> RunSummary:
        """Execute the run (see the module docstring).

        An interrupt (Ctrl-C, SIGTERM) and a storage error leave as :class:`Interrupted` and
        :class:`StorageFailure`, whose one line says whether this run's commit went through.
        """
        try:
            return self._run()
        except KeyboardInterrupt as exc:
            raise Interrupted.of(exc, self.outcome(NOTHING_COMMITTED)) from None
        except (ValueError, FungiError, LeaseLost):
            raise
        except Exception as exc:
            cause = storage_cause(exc)
            if cause is None:
                raise
            where = f"input {self.config.input}, output {self.table.uri}"
            before = ("nothing was committed; run again once the store is reachable and writable "
                      "(the next run cleans up)")
            failed = describe_storage_error(cause)
            raise StorageFailure(f"storage failed: {failed} ({where}); {self.outcome(before)}") from exc

    def outcome(self, before_commit: str) -> str:
        """What a run stopped now leaves: ``before_commit`` before its commit point, else its committed features."""
        if self.table.committed():
            return ("this run's features were committed (its commit point had passed); "
                    "the next run finishes its clean-up")
        return before_commit

    def _run(self) -> RunSummary:
        from pipelines.ray_runtime import init_ray

        config = self.config
        self.validate_settings()
        self.listing = list_sources(config.input, config.storage_options, config.catalog)
        self.input, listing = self.listing.location, self.listing.files
        self.check_overlap()
        recorded = self.recorded_spec(listing)
        resolving = None if recorded else SpecResolver(config, in_place=self.likely_in_process(listing))
        if resolving and not runs_in_process(0, config):
            init_ray(config.address)  # a cluster, or small jobs off: Ray starts while the child loads the model
        self.spec = resolving.result() if resolving else recorded
        self.validate_spec()
        with OutputLease(self.output, self.run_id, timeout_s=config.lease_timeout, break_lease=config.break_lease) as lease:
            previous = self.reconcile(self.table.recover(self.run_id, tolerate_unreadable=config.overwrite))
            plan = plan_night(
                listing, previous, incremental=config.incremental, prune=config.prune, retry_failed=config.retry_failed
            )
            if plan.to_read and not self.spec.decoder:  # the output changed since it was peeked at
                self.spec = SpecResolver(config).result()
                self.validate_spec()
                previous = self.reconcile(previous)
            schema, input_rows = self.read_schema(plan, previous)
            tasks = self.tasks_for(plan, input_rows)
            if plan.work:
                input_rows = live_row_counts(self.input, [work.input for work in plan.to_read], input_rows, tasks)
            try:
                summary = self.featurize_and_commit(plan, previous, schema, input_rows, listing, lease, tasks)
            except Exception:
                if not self.table.committed():  # before the commit point: nothing of this run may stay
                    self.delete_staging(self.staging.path)
                raise
            self.delete_staging(None)
        return summary

    def delete_staging(self, area: str | None) -> None:
        """Delete this run's staging ``area`` (None: already gone), then ``_staging/`` if nothing else is in it.

        Best effort: on a store that just failed, the next run deletes what is left.
        """
        fs = self.output.filesystem()
        try:
            if area is not None:
                delete_tree(fs, area)
            delete_empty_dir(fs, self.output.child_path(STAGING_DIR))
        except Exception as exc:  # noqa: BLE001 - the error that stopped the run is the one to report
            log.warning("could not delete the staging area of %s: %s", self.table.uri, exc)

    def likely_in_process(self, listing: list[InputFile]) -> bool:
        """Whether the job will most likely run in this process (:func:`runs_in_process`), judged before any
        footer is read: small jobs allowed and at most :data:`SMALL_INPUT_BYTES` of input. Such a job's spec is
        resolved here, where its model is loaded anyway. A misjudged one (more rows than ``--in-process-rows``
        in so few bytes) still runs on Ray, with torch in a driver of a small job."""
        return runs_in_process(0, self.config) and sum(info.size for info in listing) <= SMALL_INPUT_BYTES

    def tasks_for(self, plan: NightPlan, footer_rows: dict[str, int]) -> Tasks:
        """Where this run's tasks execute: this process for a small job, else Ray (started now if need be)."""
        from pipelines.ray_runtime import init_ray

        rows = sum(footer_rows.get(work.source, 0) for work in plan.to_read)
        if runs_in_process(rows, self.config):
            return InProcessTasks()
        if plan.work:
            init_ray(self.config.address)
        return RayTasks()

    def featurize_and_commit(self, plan: NightPlan, previous: Manifest | None, schema: InputSchema,
                             input_rows: dict[str, int], listing: list[InputFile], lease: OutputLease,
                             tasks: Tasks) -> RunSummary:
        """Steps 3-6 under the lease: id checks, setup, stream, finalize, commit."""
        stream = Stream(self.config, self.spec, self.columns, self.input, self.staging, self.run_id, self.started,
                        table_format=self.table, tasks=tasks)
        id_type = schema.type_of(self.columns.id)
        reads = plan.to_read
        setup = SetupStage(self.config, self.spec, self.columns, self.listing, self.output, self.run_id,
                           stream.resources if reads else None, tasks)
        setup_state, setup_artifact = (  # drawn and encoded while the ids are checked
            setup.start(previous) if reads else (None, previous.setup_artifact if previous else None)
        )
        id_check = check_ids(
            plan, input_location=self.input, output=self.output, scratch=self.staging.join("ids"),
            id_column=self.columns.id, id_type=id_type, input_rows=input_rows, tasks=tasks,
        )
        id_check.failed.update(self.unreadable)
        setup.check_draw()
        stats = stream.run(plan, schema, sum(input_rows[w.source] for w in plan.to_read), setup_state)
        setup.save(setup_state, setup_artifact)
        results = stream.finalize(plan, stats, input_rows, id_type) + self.unreadable_results(plan, id_check.failed)
        manifest = self.next_manifest(previous, plan, results, schema, setup_artifact)
        summary, record = summarize(self.identity, manifest, plan, results, stats, listing, id_check)
        record.input_version = self.listing.version
        manifest.runs.append(record)
        lease.check()
        try:
            self.table.commit(manifest, previous, self.run_id, overwrite=self.config.overwrite)
        except NothingToCommit as exc:  # the exit code follows --max-error-fraction, as for any failed rows
            delete_tree(self.output.filesystem(), self.staging.path)
            summary.uncommitted = str(exc)
        return summary


    def unreadable_results(self, plan: NightPlan, failed: dict[str, str]) -> list[dict[str, Any]]:
        """Finalize results of the new input files that could not be read: their reason in ``_errors/``
        (:func:`~pipelines.job.finalize.unreadable_source_row`). A file with committed features keeps its row
        and features; its failure is in the run record."""
        files = {info.relpath: info for info in self.listing.files}
        metadata = spec_metadata(self.spec.json, self.spec.hash)
        return [
            {"row": unreadable_source_row(files[source], message, output=self.output, staging=self.staging,
                                          data_name=self.table.data_name(source, self.run_id), metadata=metadata,
                                          run_id=self.run_id),
             "counts": {}, "failed": None, "opened": set()}
            for source, message in failed.items() if source not in plan.committed and source in files
        ]


def run_featurize(config: FeaturizeConfig) -> RunSummary:
    """Run one featurization job with ``config`` and return its summary."""
    return FeaturizeJob(config).run()
