"""FeaturizerSpec: everything that determines a feature value, serialisable and hashable.

Two runs with the same spec hash produce the same features for the same row, on any
worker. The pipeline writes the spec JSON into every Parquet file and the manifest, and
refuses to mix outputs of different specs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from fungi_ops.errors import ConfigError
from fungi_ops.objectives import OBJECTIVES, KLConfig, ObjectiveConfig, make_objective_config
from fungi_ops.projection import PROJECTION_KIND

# The spec format: a new one changes the features of the same settings, so the spec hash
# changes with it, an output of an older format is refused by --incremental nights (never
# mixed with new rows: rebuild it with --overwrite), and fungi eval / feast still read it.
#   1: a row's random views (SimCLR's word deletions and audio crops, DINO's crops, the dense
#      negatives' draw) seeded by its id;
#   2: seeded by its content (fungi_ops.seeding.content_hash of its payload).
SPEC_FORMAT = 2
FORMAT_CHANGES = {1: "seeded each row's views by its id; this fungi seeds them by its content"}
FEATURE_ORDER = ("kl", "dino", "simclr", "dense")
PRECISIONS = ("auto", "fp32", "bf16")


def _library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fungi")
    except PackageNotFoundError:
        return "0.0.0+local"


def feature_column(objective_name: str) -> str:
    """Output column of an objective's gradient feature: ``grad_<name>``."""
    return f"grad_{objective_name}"


@dataclass(frozen=True)
class FeaturizerSpec:
    """What to compute. ``Featurizer`` fills the ``None`` fields when it resolves the spec.

    ``precision``: ``auto`` runs bf16 autocast on CUDA and fp32 elsewhere.
    ``projection_dim``: output size of each gradient feature (default: embedding size).
    """

    model: str
    modality: str
    weights: str | None = None
    weights_sha256: str | None = None
    target_layer: str | None = None
    pooling: str | None = None
    objectives: tuple[ObjectiveConfig, ...] = (KLConfig(),)
    seed: int = 0
    projection: str = PROJECTION_KIND
    projection_dim: int | None = None
    embed_dim: int | None = None
    precision: str = "auto"
    version: str = field(default_factory=_library_version)

    def __post_init__(self) -> None:
        if self.modality not in ("image", "text", "audio"):
            raise ConfigError(f"modality must be image, text or audio, got '{self.modality}'")
        if self.projection != PROJECTION_KIND:
            raise ConfigError(f"projection must be '{PROJECTION_KIND}', got '{self.projection}'")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'")
        if self.projection_dim is not None and (isinstance(self.projection_dim, bool) or self.projection_dim < 1):
            raise ConfigError(f"projection_dim (--projection-dim) must be >= 1, got {self.projection_dim}")
        names = [o.name for o in self.objectives]
        if len(set(names)) != len(names):
            raise ConfigError(f"objectives repeat: {', '.join(names)}")
        if any(o.view_kind == "dense" for o in self.objectives) and len(names) > 1:
            raise ConfigError(f"the dense objective is computed alone (per patch); got {', '.join(names)}")
        ordered = sorted(
            self.objectives,
            key=lambda o: (FEATURE_ORDER.index(o.name) if o.name in FEATURE_ORDER else len(FEATURE_ORDER), names.index(o.name)),
        )
        object.__setattr__(self, "objectives", tuple(ordered))

    @property
    def is_dense(self) -> bool:
        """True for per-patch features (the ``dense`` objective, see :class:`~fungi_ops.objectives.DenseConfig`)."""
        return any(o.view_kind == "dense" for o in self.objectives)

    @property
    def setup_rows(self) -> int:
        """Rows of setup data the objectives need (SimCLR's negatives once resolved, the dense
        support's images); 0 for none."""
        return max(
            (getattr(o, "num_negatives", None) or getattr(o, "support_rows", None) or 0 for o in self.objectives),
            default=0,
        )

    @property
    def feature_names(self) -> list[str]:
        """Column names in their fixed order: ``embedding`` then one ``grad_<objective>`` each."""
        return ["embedding", *(feature_column(o.name) for o in self.objectives)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary; objectives as ``{"name", "params"}`` entries."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "objectives"}
        data["objectives"] = [{"name": o.name, "params": o.params()} for o in self.objectives]
        data["format"] = SPEC_FORMAT
        return data

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): what the hash and the file metadata hold."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def hash(self) -> str:
        """Stable short hash of the canonical JSON."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FeaturizerSpec":
        """Inverse of :meth:`to_dict`; raises ConfigError for unknown fields or objectives."""
        data = dict(data)
        written = data.pop("format", SPEC_FORMAT)
        if written != SPEC_FORMAT:
            change = FORMAT_CHANGES.get(written, "computes other features")
            raise ConfigError(
                f"spec format {written} was written by another fungi version ({change}): its features cannot "
                f"be computed again; rebuild the output with --overwrite"
            )
        objectives = tuple(
            make_objective_config(entry["name"], **entry.get("params", {})) for entry in data.pop("objectives", [])
        )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown spec field(s): {', '.join(unknown)}")
        return cls(objectives=objectives, **data)

    @classmethod
    def from_json(cls, text: str | bytes) -> "FeaturizerSpec":
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))


def parse_objectives(text: str) -> tuple[ObjectiveConfig, ...]:
    """``"kl,simclr"`` -> default configs; ``"kl:temperature=10"`` sets a parameter."""
    configs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, rest = item.partition(":")
        params: dict[str, Any] = {}
        for assignment in filter(None, rest.split(";")):
            key, _, value = assignment.partition("=")
            try:
                params[key.strip()] = json.loads(value)
            except json.JSONDecodeError:
                params[key.strip()] = value
        configs.append(make_objective_config(name.strip(), **params))
    if not configs:
        raise ConfigError(f"no objective given; known: {', '.join(sorted(OBJECTIVES))}")
    return tuple(configs)
