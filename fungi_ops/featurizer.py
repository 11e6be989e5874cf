"""The FUNGI featurizer: embedding plus one projected gradient feature per objective.

One call of :meth:`Featurizer.featurize` on a batch

1. builds every view of every sample on the device (eval view first, then each
   objective's views), seeded by the row's content key (the hash of its raw payload,
   :func:`~fungi_ops.seeding.content_hash`), never its id;
2. runs them through the frozen backbone with the target layer's hook armed: in one
   forward pass on accelerators, in chunks of rows on the CPU (see ``CPU_FORWARD_ELEMENTS``);
3. backpropagates the per-sample losses of all objectives (one backward when their
   views are disjoint) down to the target layer only;
4. forms each sample's weight+bias gradient in closed form, projects it with the
   seeded Rademacher matrix and L2-normalises it.

Features of a sample depend on its content only: never on its id, nor on the other
samples of the batch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fungi_ops.adapters import ViewGroup, make_adapter
from fungi_ops.backbones import Backbone, load_backbone, resolve_target_layer
from fungi_ops.batch_size import AUTO, AUTO_CPU_BATCH, AUTO_MAX_BATCH, AUTO_MEMORY_FRACTION, parse_batch_size
from fungi_ops.errors import ConfigError, SampleError
from fungi_ops.gradients import LinearGradientTap, accumulate_linear_gradients
from fungi_ops.objectives import Objective
from fungi_ops.projection import RandomProjection
from fungi_ops.seeding import content_hash
from fungi_ops.spec import FeaturizerSpec, feature_column

log = logging.getLogger(__name__)
SETUP_FILE = "setup.safetensors"
# On the CPU the backbone runs on chunks of rows whose target-layer input holds at most
# this many values. Bigger activations are mmap'ed afresh by the allocator on every call,
# and their page faults cost up to ~40% of a ViT-Tiny forward (measured: 248 views in one
# pass 66 ms/view, chunks of 12-16 views 31-42 ms/view, with no page faults).
CPU_FORWARD_ELEMENTS = 1 << 19
# ``--batch-size auto`` probes the peak memory of featurizing this many rows (two sizes:
# the growth between them is the cost of a row, the rest is fixed)
AUTO_PROBE_ROWS = (1, 4)


@dataclass
class FeatureBatch:
    """Features of the rows that succeeded, and an error message for each row that failed."""

    keys: list[str]
    features: dict[str, np.ndarray]
    errors: dict[int, SampleError] = field(default_factory=dict)

    @property
    def ok_rows(self) -> list[int]:
        """Indices (into the input batch) of the rows that have features, in order."""
        return [i for i in range(len(self.keys)) if i not in self.errors]


def resolve_spec(spec: FeaturizerSpec, backbone: Backbone) -> FeaturizerSpec:
    """Fill what the loaded backbone determines (target layer, dims, weights hash, pooling)
    and the objectives' modality defaults; check what the spec already pins.

    Cheap enough for a job driver to fail fast on bad settings before any data is read.
    """
    target, _ = resolve_target_layer(backbone.model, spec.target_layer, backbone.default_target)
    if spec.weights_sha256 and backbone.weights_sha256 and spec.weights_sha256 != backbone.weights_sha256:
        raise ConfigError(
            f"weights {spec.weights} have sha256 {backbone.weights_sha256[:12]}..., "
            f"the spec expects {spec.weights_sha256[:12]}..."
        )
    if spec.embed_dim is not None and spec.embed_dim != backbone.embed_dim:
        raise ConfigError(f"model {spec.model} embeds to {backbone.embed_dim}, the spec expects {spec.embed_dim}")
    return dataclasses.replace(
        spec,
        target_layer=target,
        weights_sha256=backbone.weights_sha256,
        pooling=backbone.pooling,
        objectives=tuple(config.resolved(spec.modality).for_backbone(backbone) for config in spec.objectives),
        embed_dim=backbone.embed_dim,
        projection_dim=spec.projection_dim or backbone.embed_dim,
    )


def setup_encoding_order(samples: Sequence[Any]) -> list[int]:
    """The order in which setup samples are encoded: texts by length, the rest as given.

    A chunk of texts is padded to its longest, so length order wastes little (256 demo
    negatives: 15.0 s instead of 23.3 s on one core, measured). A job that splits the
    encoding over workers cuts this order into parts, so that every part encodes the
    same chunks as one process would.
    """
    return sorted(range(len(samples)), key=lambda i: len(samples[i]) if isinstance(samples[i], str) else 0)


class FeaturizerBase(ABC):
    """What :class:`Featurizer` and :class:`~fungi_ops.dense.DenseFeaturizer` share, so that a caller
    that only moves rows (the pipeline's actors and setup task, :func:`fungi_ops.factory.make_featurizer`)
    treats both alike: the resolved :attr:`spec`, decoding a payload, featurizing decoded samples
    (a batch with ``keys``, ``features`` and ``errors``), and a setup state (SimCLR negatives, a dense
    support index) that is computed once, shipped to every worker and saved beside the output.
    """

    spec: FeaturizerSpec
    backbone: Backbone
    device: torch.device

    def _load_model(self, spec: FeaturizerSpec, device: str | torch.device | None, trust_remote_code: bool) -> None:
        """Load the spec's frozen backbone for ``device`` (default: CUDA when available) and resolve the
        spec against it (:func:`resolve_spec`): what both featurizers' constructors start with."""
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.backbone = load_backbone(spec.model, spec.modality, weights=spec.weights, seed=spec.seed,
                                      pooling=spec.pooling, trust_remote_code=trust_remote_code)
        self.spec = resolve_spec(spec, self.backbone)

    @abstractmethod
    def decode(self, payload: Any) -> Any:
        """A raw payload (bytes, text) -> the decoded sample :meth:`featurize` takes; SampleError for a bad one."""

    @abstractmethod
    def featurize(self, samples: Sequence[Any], keys: Sequence[str]) -> Any:
        """Features of decoded samples, whose views are seeded by ``keys`` (their content keys)."""

    @abstractmethod
    def setup_state(self) -> dict[str, torch.Tensor]:
        """The setup state, as tensors by name (what :meth:`save_setup` writes)."""

    @abstractmethod
    def load_setup_state(self, state: Mapping[str, Any]) -> None:
        """Install a state of :meth:`setup_state` (tensors or numpy arrays, e.g. from the object store); copied."""

    def save_setup(self, path: str | Path) -> None:
        """Write :meth:`setup_state` to a safetensors file tagged with the spec hash."""
        write_setup_file(self.setup_state(), path, self.spec.hash)

    def load_setup(self, path: str | Path) -> None:
        """Install a file written by :meth:`save_setup`; ConfigError if it belongs to another spec."""
        self.load_setup_state(read_setup_file(path, self.spec.hash))

    def featurize_payloads(self, payloads: Sequence[Any], keys: Sequence[str]) -> Any:
        """Decode then featurize; rows that fail to decode are reported, the rest go on.

        ``keys`` (row ids) only name the rows of the result: the views are seeded by each
        payload's content key (:func:`decode_payloads`).
        """
        decoded, content_keys, decoded_rows, errors = decode_payloads(self.decode, payloads)
        result = self.featurize(decoded, content_keys)
        errors.update({decoded_rows[i]: exc for i, exc in result.errors.items()})
        return dataclasses.replace(result, keys=[str(k) for k in keys], errors=errors)


class Featurizer(FeaturizerBase):
    """Load a frozen backbone once, then featurize batches of decoded samples.

    ``device``: where the model runs (default: CUDA when available).
    ``projection``: an explicit ``[k, d]`` matrix instead of the seeded one (for parity
    checks against other implementations).
    """

    def __init__(
        self,
        spec: FeaturizerSpec,
        *,
        device: str | torch.device | None = None,
        projection: torch.Tensor | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        if spec.is_dense:
            raise ConfigError("the 'dense' objective makes per-patch features: use fungi_ops.dense.DenseFeaturizer")
        self._load_model(spec, device, trust_remote_code)
        _, layer = resolve_target_layer(self.backbone.model, self.spec.target_layer, self.backbone.default_target)
        self.backbone.model.to(self.device)
        self.adapter = make_adapter(self.backbone)

        # Heads and losses run in float64 (autocast leaves float64 alone; MPS has none): the
        # loss gradient reaching the embedding is a small remainder once F.normalize's
        # backward removes its radial part, and in float32 that cancellation turned the
        # rounding noise of the head matmul into ~3e-5 differences of a normalised KL
        # feature between batch sizes (the tests allow 1e-5).
        self.loss_dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self.objectives: dict[str, Objective] = {
            config.name: config.build(self.backbone.embed_dim, spec.modality, spec.seed).to(self.device, self.loss_dtype)
            for config in self.spec.objectives
        }
        self.groups = self._view_groups()
        self.tap = LinearGradientTap(layer)
        self._tokens_per_row: int | None = None
        self.compute_dtype = self._compute_dtype()
        self.projection = RandomProjection.for_featurizer(
            self.spec.projection_dim, self.tap.gradient_dim, self.spec.seed, dtype=self.compute_dtype,
            device=self.device, explicit=projection,
        )

    # -- construction helpers -------------------------------------------------
    def _view_groups(self) -> list[ViewGroup]:
        groups = [ViewGroup("eval", 1)]
        for objective in self.objectives.values():
            kind = objective.config.view_kind
            if kind not in self.adapter.view_kinds:
                raise ConfigError(f"objective '{objective.name}' needs '{kind}' views, which {self.spec.modality} lacks")
            if kind != "eval":
                count = self.adapter.views_per_sample(kind, objective.config)
                groups.append(ViewGroup(kind, count, objective.config))
        return groups

    def _compute_dtype(self) -> torch.dtype:
        precision = self.spec.precision
        if precision == "bf16" or (precision == "auto" and self.device.type == "cuda"):
            return torch.bfloat16
        return torch.float32

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.compute_dtype == torch.bfloat16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- public API -----------------------------------------------------------
    @property
    def feature_names(self) -> list[str]:
        """Output columns in order: ``embedding`` then ``grad_<objective>`` per objective."""
        return self.spec.feature_names

    @property
    def feature_dims(self) -> dict[str, int]:
        """Width of each output column: the backbone's embed dim, and ``projection_dim`` per gradient."""
        dims = {"embedding": self.backbone.embed_dim}
        dims.update({feature_column(name): self.spec.projection_dim for name in self.objectives})
        return dims

    @property
    def needs_setup(self) -> bool:
        """True when some objective (SimCLR) needs :meth:`setup` or :meth:`load_setup` before featurizing."""
        return any(objective.needs_setup for objective in self.objectives.values())

    def decode(self, payload: Any) -> Any:
        """Canonical form of one raw payload; raises SampleError for a bad row."""
        return self.adapter.decode(payload)

    def _group_of(self, objective: Objective) -> tuple[int, int, int]:
        """(index, first row, rows) of the objective's view group for a batch of one."""
        start = 0
        for index, group in enumerate(self.groups):
            if group.kind == objective.config.view_kind and (group.config is None or group.config == objective.config):
                return index, start, group.count
            start += group.count
        raise AssertionError(f"no view group for {objective.name}")

    @torch.no_grad()
    def setup(self, samples: Sequence[Any], keys: Sequence[str], batch_size: int = 8) -> None:
        """Encode supporting data (SimCLR negatives) from decoded samples of a training split.

        ``keys`` seed the negatives' views: the job passes the rows' ids, which also drew
        them (:func:`~fungi_ops.seeding.setup_order`). The negatives are the run's state,
        saved with its output (:meth:`save_setup`) and loaded wherever its features are
        computed, not a row's features, which depend on the row's content only.

        Samples are encoded in :func:`setup_encoding_order` (texts by length: a chunk is
        padded to its longest text), in chunks of ``batch_size``; the negatives keep the
        order of ``samples``.
        """
        order = setup_encoding_order(samples)
        inverse = torch.argsort(torch.tensor(order)) if order else torch.zeros(0, dtype=torch.long)
        for objective in self.objectives.values():
            if not objective.needs_setup:
                continue
            index, _, count = self._group_of(objective)
            group = self.groups[index]
            latents = []
            for start in range(0, len(samples), batch_size):
                rows = order[start : start + batch_size]
                chunk, chunk_keys = [samples[i] for i in rows], [keys[i] for i in rows]
                inputs = self.adapter.build_views(chunk, chunk_keys, [group], self.spec.seed, self.device)
                with self._autocast():
                    embeddings = self._embed(inputs)
                    latents.append(objective.latents(embeddings.to(self.loss_dtype)).float())
            encoded = torch.cat(latents)  # sample-major: each sample's views are consecutive rows
            per_sample = encoded.reshape(len(samples), -1, encoded.shape[-1])
            objective.set_negatives(per_sample[inverse].reshape(encoded.shape))

    def setup_state(self) -> dict[str, torch.Tensor]:
        """Supporting tensors, keyed by objective, for saving next to the output."""
        return {
            f"{name}.negatives": objective.negatives.detach().cpu().contiguous()
            for name, objective in self.objectives.items()
            if objective.needs_setup
        }

    def load_setup_state(self, state: Mapping[str, Any]) -> None:
        """Install supporting tensors (or arrays) saved by :meth:`setup_state`; they are copied."""
        for name, objective in self.objectives.items():
            if objective.needs_setup:
                if f"{name}.negatives" not in state:
                    raise ConfigError(f"setup artifact has no '{name}.negatives'")
                value = state[f"{name}.negatives"]
                # copies: arrays from the object store are read-only, tensors may be shared
                objective.set_negatives(value.detach().clone() if isinstance(value, torch.Tensor) else torch.tensor(value))

    def featurize(self, samples: Sequence[Any], keys: Sequence[str]) -> FeatureBatch:
        """Features of decoded samples. A row whose features are not finite is reported, not returned.

        ``keys``: each sample's content key, :func:`~fungi_ops.seeding.content_hash` of the
        payload it was decoded from (the job's ``content_hash`` column). It seeds the sample's
        views, so that equal payloads get equal features whatever their ids; pass ids here and
        the features depend on the ids. :meth:`featurize_payloads` computes the keys itself.
        """
        if len(samples) != len(keys):
            raise ValueError(f"{len(samples)} samples but {len(keys)} keys")
        keys = [str(k) for k in keys]
        if not samples:
            return FeatureBatch(keys, {name: np.zeros((0, dim), np.float32) for name, dim in self.feature_dims.items()})
        inputs = self.adapter.build_views(samples, keys, self.groups, self.spec.seed, self.device)
        features = self.featurize_views(inputs, len(samples))
        finite = np.all([np.isfinite(values).all(axis=1) for values in features.values()], axis=0)
        errors = {
            int(i): SampleError("features are not finite (NaN/inf in the model output or gradient)", stage="featurize")
            for i in np.flatnonzero(~finite)
        }
        if errors:
            features = {name: values[finite] for name, values in features.items()}
        return FeatureBatch(keys, features, errors)

    def featurize_views(self, inputs: Any, batch: int) -> dict[str, np.ndarray]:
        """Features from model-ready views laid out as :attr:`groups` (group-major, sample-major)."""
        self.tap.armed = True
        try:
            with torch.enable_grad(), self._autocast():
                embeddings = self._embed(inputs)
                losses = self._losses(embeddings, batch)
            outputs = {"embedding": F.normalize(embeddings[:batch].float(), dim=-1)}
            outputs.update(self._gradient_features(losses, batch))
        finally:
            self.tap.armed = False
            self.tap.clear()
        return {name: outputs[name].detach().cpu().numpy() for name in self.feature_names}

    def _embed(self, inputs: Any) -> torch.Tensor:
        """Backbone embeddings of all rows, in chunks of ``_rows_per_forward`` rows."""
        return torch.cat([self.backbone.embed(chunk) for chunk in _row_chunks(inputs, self._rows_per_forward(inputs))])

    def _rows_per_forward(self, inputs: Any) -> int:
        """All rows on accelerators; on the CPU, as many as fit ``CPU_FORWARD_ELEMENTS``."""
        if self.device.type != "cpu":
            return _row_count(inputs)
        return max(1, CPU_FORWARD_ELEMENTS // (self._row_tokens(inputs) * self.tap.layer.in_features))

    def _row_tokens(self, inputs: Any) -> int:
        """Tokens per row at the target layer: the padded length for text, else probed once on one row."""
        if isinstance(inputs, dict):
            return int(next(iter(inputs.values())).shape[1])
        if self._tokens_per_row is None:
            shapes: list[torch.Size] = []
            handle = self.tap.layer.register_forward_hook(lambda module, args, output: shapes.append(args[0].shape))
            armed, self.tap.armed = self.tap.armed, False  # the probe is not a chunk
            try:
                with torch.no_grad(), self._autocast():
                    self.backbone.embed(inputs[:1])
            finally:
                handle.remove()
                self.tap.armed = armed
            self._tokens_per_row = math.prod(shapes[0][1:-1])
        return self._tokens_per_row

    def _losses(self, embeddings: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
        losses = {}
        for name, objective in self.objectives.items():
            _, first, count = self._group_of(objective)
            rows = embeddings[first * batch : (first + count) * batch]
            losses[name] = objective.loss(rows.reshape(batch, count, -1).to(self.loss_dtype)).sum()
        return losses

    def _gradient_features(self, losses: dict[str, torch.Tensor], batch: int) -> dict[str, torch.Tensor]:
        # Objectives whose views are disjoint share one backward pass; objectives that
        # share a view group get their own, so their gradients never mix.
        rounds: list[list[str]] = []
        for name in losses:
            group = self._group_of(self.objectives[name])[0]
            target = next((r for r in rounds if all(self._group_of(self.objectives[o])[0] != group for o in r)), None)
            if target is None:
                rounds.append([name])
            else:
                target.append(name)
        features = {}
        for position, names in enumerate(rounds):
            output_grads = torch.autograd.grad(
                sum(losses[name] for name in names),
                self.tap.outputs,
                retain_graph=position < len(rounds) - 1,
                allow_unused=True,  # chunks that hold none of these objectives' views
            )
            for name in names:
                _, first, count = self._group_of(self.objectives[name])
                begin, end = first * batch, (first + count) * batch
                total = torch.zeros((batch, self.tap.gradient_dim), dtype=torch.float32, device=self.device)
                chunk_start = 0
                for inputs, grads in zip(self.tap.inputs, output_grads):
                    low, high = max(begin, chunk_start), min(end, chunk_start + inputs.shape[0])
                    if low < high and grads is not None:
                        accumulate_linear_gradients(
                            total,
                            inputs[low - chunk_start : high - chunk_start],
                            grads[low - chunk_start : high - chunk_start],
                            low - begin,
                            count,
                            self.tap.has_bias,
                        )
                    chunk_start += inputs.shape[0]
                features[feature_column(name)] = F.normalize(self.projection(total), dim=-1)
        return features


FeaturizeFn = Callable[[Sequence[Any], Sequence[str]], Any]


def merge_feature_batches(parts: Sequence[Any]) -> Any:
    """One batch from consecutive parts (``FeatureBatch`` or ``DenseBatch``): keys and
    features concatenated, each part's error rows shifted by the rows before it."""
    if len(parts) == 1:
        return parts[0]
    keys: list[str] = []
    errors: dict[int, SampleError] = {}
    for part in parts:
        errors.update({len(keys) + row: error for row, error in part.errors.items()})
        keys.extend(part.keys)
    features = {name: np.concatenate([part.features[name] for part in parts]) for name in parts[0].features}
    return dataclasses.replace(parts[0], keys=keys, features=features, errors=errors)


def release_accelerator_memory(device: torch.device) -> None:
    """Give cached blocks back after an out-of-memory error, so that a smaller batch can fit."""
    gc.collect()  # the failed call's frames may still hold activations
    if device.type == "cuda":
        torch.cuda.empty_cache()


class BatchRunner:
    """Featurize batches in chunks of ``batch_size`` rows, halving a chunk that runs out of memory.

    ``batch_size``: rows per featurize call, or ``"auto"``: chosen by
    :func:`auto_batch_size` on the first batch, from the model and the device's memory.
    A chunk that raises ``torch.OutOfMemoryError`` halves the chunk size and is redone
    (down to one row, which then raises), and the size stays halved, so that an oversized
    guess costs one failed call, not one per batch. Features do not depend on the batch
    (tests/test_engine.py: within 1e-5; the CPU's matmul blocking varies with the rows),
    so a split batch gives the features of the whole one.

    ``memory_share``: the fraction of the device this process may use (an actor's
    ``--gpus-per-actor`` when several share a GPU).
    """

    def __init__(
        self,
        featurizer: FeaturizerBase,
        batch_size: int | str = AUTO,
        *,
        memory_share: float = 1.0,
        featurize: FeaturizeFn | None = None,
    ) -> None:
        batch_size = parse_batch_size(batch_size)
        self.featurizer = featurizer
        self.featurize = featurize or featurizer.featurize
        self.memory_share = memory_share
        self.batch_size: int | None = None if batch_size == AUTO else int(batch_size)
        self.splits = 0  # chunks that ran out of memory and were halved

    def __call__(self, samples: Sequence[Any], keys: Sequence[str]) -> Any:
        """The features of ``samples``, as one ``featurize`` call on all of them would give."""
        if self.batch_size is None:
            if not samples:  # nothing to measure the memory of a row on
                return self.featurize(samples, keys)
            self.batch_size = auto_batch_size(self.featurizer, samples, keys, self.featurize, self.memory_share)
        parts, start = [], 0
        while start < len(samples) or not parts:
            rows = slice(start, start + self.batch_size)
            part = self._attempt(samples[rows], keys[rows])
            if part is not None:  # else: out of memory, the batch size was halved; redo from ``start``
                parts.append(part)
                start += len(part.keys)
        return merge_feature_batches(parts)

    def _attempt(self, samples: Sequence[Any], keys: Sequence[str]) -> Any | None:
        """One featurize call, or None (batch size halved) when it ran out of memory with more than one row."""
        try:
            return self.featurize(samples, keys)
        except torch.OutOfMemoryError:
            if len(samples) <= 1:
                raise
        # outside the except block, whose traceback would keep the failed call's tensors alive
        release_accelerator_memory(self.featurizer.device)
        self.batch_size = -(-len(samples) // 2)
        self.splits += 1
        log.warning("a batch of %d rows ran out of memory; batch size now %d", len(samples), self.batch_size)
        return None


def auto_batch_size(
    featurizer: FeaturizerBase,
    samples: Sequence[Any],
    keys: Sequence[str],
    featurize: FeaturizeFn | None = None,
    memory_share: float = 1.0,
) -> int:
    """Rows per featurize call for ``--batch-size auto``.

    CPU (and MPS): ``AUTO_CPU_BATCH``. CUDA: featurize the first 1 and 4 rows of
    ``samples`` (any rows do: the cost of a row depends on the model, its views and the
    input size, not on its content), take the peak-memory growth per row between the two,
    and fit as many rows as ``AUTO_MEMORY_FRACTION`` of ``memory_share`` of the free
    memory holds, rounded down to a multiple of 8, within [1, ``AUTO_MAX_BATCH``]. A guess
    that is still too big is halved by :class:`BatchRunner`.
    """
    device = featurizer.device
    if device.type != "cuda" or not samples:
        return AUTO_CPU_BATCH
    featurize = featurize or featurizer.featurize
    peaks = []
    sizes = [min(rows, len(samples)) for rows in AUTO_PROBE_ROWS]
    for rows in sizes:
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        featurize(samples[:rows], keys[:rows])
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
    per_row = (peaks[1] - peaks[0]) / (sizes[1] - sizes[0]) if sizes[1] > sizes[0] else peaks[0]
    fixed = max(0.0, peaks[0] - per_row)
    free, total = torch.cuda.mem_get_info(device)
    budget = AUTO_MEMORY_FRACTION * min(free, memory_share * total) - fixed
    rows = int(budget // max(per_row, 1.0))
    chosen = max(1, min(AUTO_MAX_BATCH, rows if rows < 8 else rows // 8 * 8))
    log.info("batch size auto: %.0f MiB a row, %.0f MiB free of %.0f, %d rows", per_row / 2**20, free / 2**20, total / 2**20, chosen)
    return chosen


def decode_payloads(
    decode: Callable[[Any], Any], payloads: Sequence[Any]
) -> tuple[list[Any], list[str], list[int], dict[int, SampleError]]:
    """``(decoded samples, their content keys, their row indices, {row: error})``: a row that
    fails to decode is reported, not raised. The content keys (:func:`~fungi_ops.seeding.content_hash`
    of the raw payloads) are those the job computes where it reads the rows, so a payload
    featurized here gets the features of its copies in any output.
    """
    decoded, content_keys, decoded_rows, errors = [], [], [], {}
    for row, payload in enumerate(payloads):
        try:
            decoded.append(decode(payload))
        except SampleError as exc:
            errors[row] = exc
            continue
        content_keys.append(content_hash(payload))
        decoded_rows.append(row)
    return decoded, content_keys, decoded_rows, errors


def write_setup_file(state: dict[str, torch.Tensor], path: str | Path, spec_hash: str) -> None:
    """Save a setup state (tensors by name) as safetensors tagged ``fungi.spec_hash``."""
    from safetensors.torch import save_file

    save_file(state, str(path), metadata={"fungi.spec_hash": spec_hash})


def read_setup_file(path: str | Path, spec_hash: str) -> dict[str, torch.Tensor]:
    """Tensors of a file written by :func:`write_setup_file`; ConfigError if it belongs to another spec."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        stored = (handle.metadata() or {}).get("fungi.spec_hash")
        if stored != spec_hash:
            raise ConfigError(f"setup artifact {path} belongs to spec {stored}, not {spec_hash}")
        return {key: handle.get_tensor(key) for key in handle.keys()}


def _row_count(inputs: Any) -> int:
    return int(next(iter(inputs.values())).shape[0]) if isinstance(inputs, dict) else int(inputs.shape[0])


def _row_chunks(inputs: Any, rows: int) -> list[Any]:
    """Consecutive slices of ``rows`` rows of a tensor or of a dict of tensors (text)."""
    total = _row_count(inputs)
    if isinstance(inputs, dict):
        return [{key: value[start : start + rows] for key, value in inputs.items()} for start in range(0, total, rows)]
    return [inputs[start : start + rows] for start in range(0, total, rows)]
