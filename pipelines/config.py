"""The settings of a featurization run: what the CLI flags map onto, and their own checks.

:class:`FeaturizeConfig` is the whole input of :func:`pipelines.job.run_featurize`; its
:meth:`~FeaturizeConfig.validate` refuses contradictory flags before anything is read, and
:func:`spec_settings` is the part of it that determines the features (what the manifest
records, so that a night with nothing to read can reuse the recorded spec).

Why a small job stays in the driver (``--in-process-rows``, :func:`runs_in_process`): on
Ray every run pays fresh worker processes that import torch and load the model (about
5 s on 2 cores for a 1-layer text model) and Ray's own start; a job of a few dozen
samples then costs more in set-up than in featurizing. A job given ``--address`` (a
cluster, whose nodes may hold models and GPUs the driver lacks) or an actor pool setting
always runs on Ray (:mod:`pipelines.tasks`: the same functions run either way).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Sequence

from fungi_ops.batch_size import parse_batch_size
from fungi_ops.errors import ConfigError
from pipelines.layout import CONTENT_HASH_COLUMN, EVENT_TIME_COLUMN, ID_COLUMN
from pipelines.tasks import DEFAULT_IN_PROCESS_ROWS

DEFAULT_DATA_COLUMNS = {"image": "image", "text": "text", "audio": "audio"}
# An input this small is taken for a small job before its footers are read: its spec is resolved in the
# driver, which loads the model for the job anyway (a few hundred images, or thousands of short texts).
SMALL_INPUT_BYTES = 64 * 2**20
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
    batch_size: int | str = "auto"  # or rows: fungi_ops.batch_size
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
    catalog: str | None = None  # the Iceberg catalog of iceberg: addresses (pipelines.formats.address.load_catalog)
    address: str | None = None
    in_process_rows: int = DEFAULT_IN_PROCESS_ROWS  # a job featurizing at most this many rows runs without Ray (runs_in_process)
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.actors is not None:  # the Python API takes N as the CLI does (a notebook writes actors=2)
            self.actors = parse_actors(self.actors)

    def validate(self) -> None:
        """Checks of the flags alone (no data, no model, no storage); ConfigError names the flag."""
        if not 0 <= self.max_error_fraction <= 1:
            raise ConfigError("--max-error-fraction must be within [0, 1]")
        parse_batch_size(self.batch_size)
        if self.in_process_rows < 0:
            raise ConfigError("--in-process-rows must be >= 0 (0: every job on Ray)")
        for flag, value in (("--gpus-per-actor", self.gpus_per_actor), ("--cpus-per-actor", self.cpus_per_actor)):
            if value is not None and not value >= 0:
                raise ConfigError(f"{flag} must be >= 0, got {value!r}")
        if self.max_image_pixels is not None and self.max_image_pixels < 1:
            raise ConfigError("--max-image-pixels must be >= 1")
        if self.incremental and self.overwrite:
            raise ConfigError("--incremental and --overwrite contradict each other")
        if (self.prune or self.retry_failed) and not self.incremental:
            raise ConfigError("--prune and --retry-failed apply to --incremental runs")
        reserved = {ID_COLUMN, CONTENT_HASH_COLUMN, EVENT_TIME_COLUMN}  # the features' own: FeaturizeJob.validate_spec
        clash = sorted(c for c in self.keep_columns if c in reserved or c.startswith("__fungi"))
        if clash:
            raise ConfigError(f"--keep-columns {', '.join(clash)} would clash with output columns")
        if self.setup_from and self.support_from and self.setup_from != self.support_from:
            raise ConfigError("--setup-from and --support-from name the same data (the setup rows); give one")

    @property
    def data_column_name(self) -> str:
        """The payload column: ``--data-column``, else the modality's default."""
        return self.data_column or DEFAULT_DATA_COLUMNS.get(self.modality, "data")


def parse_actors(value: int | str | Sequence[int]) -> tuple[int, int]:
    """The actor pool's ``(MIN, MAX)`` from ``N``, ``"N"``, ``"MIN,MAX"`` or a pair; ConfigError names --actors."""
    try:
        parts = [int(p) for p in value.split(",")] if isinstance(value, str) else (
            [value] if isinstance(value, int) and not isinstance(value, bool) else [int(p) for p in value])
    except (TypeError, ValueError):
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or not 1 <= parts[0] <= parts[1]:
        raise ConfigError(f"--actors: use N or MIN,MAX with 1 <= MIN <= MAX, got {value!r}")
    return parts[0], parts[1]


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


def runs_in_process(rows_to_featurize: int, config: FeaturizeConfig) -> bool:
    """Whether a job featurizing ``rows_to_featurize`` rows runs in the driver (see the module docstring).

    Never with ``--address`` or ``RAY_ADDRESS`` (a cluster), nor when the actor pool is set
    (``--actors``, ``--gpus-per-actor``, ``--cpus-per-actor``: the user asked for Ray's actors).
    """
    if config.address or os.environ.get("RAY_ADDRESS"):
        return False
    if config.actors is not None or config.gpus_per_actor is not None or config.cpus_per_actor is not None:
        return False
    return config.in_process_rows > 0 and rows_to_featurize <= config.in_process_rows
