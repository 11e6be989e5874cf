"""The feature spec of a run, resolved from the model without importing torch on the driver.

A run on Ray never imports torch in the driver (about 0.5 GB of resident memory for a CUDA
build, plus transformers; a small job run in one process, :mod:`pipelines.tasks`, does so by
design): :class:`SpecResolver` loads the model in a short-lived child process
(``python -m pipelines.job.spec_resolution``) while the driver starts Ray, and hands back a
:class:`ResolvedSpec`, plain data that the driver, the planner and the writers need.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import sys
from dataclasses import dataclass
from typing import Any

from fungi_ops.errors import ConfigError
from pipelines.config import FeaturizeConfig
from pipelines.manifest import Manifest

@dataclass(frozen=True)
class ResolvedSpec:
    """What the driver needs of the resolved feature spec, as plain data.

    A driver that runs its tasks on Ray never imports torch (about 0.5 GB of resident memory
    for a CUDA build, plus transformers): the model is loaded to resolve the spec in a short-lived child process
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
    decoder: bytes  # fungi_ops.factory.make_spec_decoder's decoder, pickled

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


def spec_differences(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The settings two specs (their :meth:`~fungi_ops.spec.FeaturizerSpec.to_dict`) differ in, each as ``name old → new``,
    named as the ``fungi featurize`` flags are (``seed 0 → 3``, ``objectives kl → kl,simclr``).

    A spec hash says only that something differs; a user needs to know what, to choose between
    the old settings, ``--overwrite`` and another output.
    """
    differences = []
    for key in sorted(set(recorded) | set(wanted)):
        old, new = recorded.get(key), wanted.get(key)
        if old == new:
            continue
        if key == "objectives":
            old_text, new_text = _objectives_text(old or [], new or [])
        elif key == "weights_sha256":
            key, old_text, new_text = "weights' content (sha256)", _short(old), _short(new)
        else:
            old_text, new_text = _short(old), _short(new)
        differences.append(f"{key.replace('_', '-')} {old_text} → {new_text}")
    return differences


def _objectives_text(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> tuple[str, str]:
    """Objective names; with the parameters that differ when the names are the same."""
    names = [",".join(o["name"] for o in side) for side in (old, new)]
    if names[0] != names[1]:
        return names[0], names[1]
    sides = []
    for side, other in ((old, new), (new, old)):
        parts = []
        for mine, theirs in zip(side, other):
            params = {k: v for k, v in mine.get("params", {}).items() if theirs.get("params", {}).get(k) != v}
            parts.append(mine["name"] + (":" + ";".join(f"{k}={v}" for k, v in sorted(params.items())) if params else ""))
        sides.append(",".join(parts))
    return sides[0], sides[1]


def _short(value: Any) -> str:
    """A setting's value for a message: None as 'none', a hash cut to 12 characters."""
    if value is None:
        return "none"
    text = str(value)
    return text[:12] + "…" if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text


def resolve_spec_here(config: FeaturizeConfig) -> ResolvedSpec:
    """Load the model and resolve the run's spec, in this process (imports torch)."""
    from fungi_ops.adapters import DEFAULT_MAX_IMAGE_PIXELS
    from fungi_ops.factory import make_spec_decoder
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
    tests), or a small job's (``in_place``), resolves in place: there it costs no extra memory. A ConfigError of the child
    (unknown model, bad layer, bad objective parameter) is raised by :meth:`result` with its
    message.
    """

    def __init__(self, config: FeaturizeConfig, *, in_place: bool = False) -> None:
        """``in_place``: resolve here even without torch (a job that will run in this process loads the model
        here anyway; a child would load it once more, about 10 s of a small job's 30)."""
        self.config = config
        self.process = None
        if not in_place and "torch" not in sys.modules:
            import subprocess

            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pipelines.job.spec_resolution"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
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


if __name__ == "__main__":
    _resolve_child()
