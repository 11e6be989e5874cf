"""Dense FUNGI: per-patch embeddings and per-patch gradient features of a frozen ViT.

The paper's in-context scene understanding (HummingBird) features; the reference is
``fungi-hummingbird/eval_gradients.py`` of github.com/WalterSimoncini/no-train-all-gain.
The settings are :class:`~fungi_ops.objectives.DenseConfig` (objective ``dense``), so the
:class:`~fungi_ops.spec.FeaturizerSpec` and its hash cover them.

One :meth:`DenseFeaturizer.featurize` call on a batch of decoded images:

1. view: the whole image resized to ``image_size`` x ``image_size`` (aspect not kept, as
   HummingBird's evaluation transform; done by :meth:`DenseFeaturizer.decode`), normalised;
2. forward with the target layer tapped, as :class:`~fungi_ops.featurizer.Featurizer`
   does (in row chunks on the CPU): the final-norm tokens of the last block;
3. negatives: every token, L2-normalised, queries the support index for its
   ``num_neighbors`` nearest support patches, one search per image; their head latents
   (computed once, when the support is built) are the negatives, of which a random
   ``negative_fraction`` is kept, drawn from the stream ``(seed, "dense-negatives", content key)`` (the hash of the
   image's raw payload, :func:`~fungi_ops.seeding.content_hash`: never its id);
4. the per-image InfoNCE of the tokens' latents (:class:`~fungi_ops.objectives.DenseObjective`),
   one backward pass down to the target layer only;
5. per patch ``p``, its own gradient ``g_p [x_p | 1]^T`` (the output gradient of its token
   at the target layer times the token's input, bias column included: rank one),
   projected with the seeded Rademacher matrix of :mod:`fungi_ops.projection` and
   L2-normalised. The rank-one gradients of at most :data:`PROJECTION_ELEMENTS` values
   exist at a time (a reused buffer), never those of the whole batch.

Per image the outputs are ``embedding`` ``[P, embed_dim]`` (the patch tokens, each
L2-normalised; class and register tokens dropped) and ``grad_dense`` ``[P, projection_dim]``,
``P = (image_size / patch_size)^2`` patches in row-major order of the patch grid. A
patch's features do not depend on the other images of the batch. ``fungi_ops.dense_table``
turns a :class:`DenseBatch` into Arrow.

The support (:meth:`DenseFeaturizer.setup`): ``support_patches_per_image`` patches, drawn
from ``(seed, "support", id)``, of each of the first ``DenseConfig.support_rows`` images of a
training split in :func:`~fungi_ops.seeding.setup_order`, up to ``support_size`` patches;
their unit-norm tokens go into a :class:`~fungi_ops.neighbours.NeighbourIndex`, their head
latents beside it. :meth:`DenseFeaturizer.setup_state` holds both for a setup artifact.

For a featurize job (``pipelines``): resolve the spec on the driver
(:func:`~fungi_ops.featurizer.resolve_spec` fills ``image_size``; ``spec.is_dense`` picks
this path, in :func:`fungi_ops.factory.make_spec_decoder` and
:func:`fungi_ops.factory.make_featurizer`), decode on workers with
:func:`make_dense_decoder`, build the support from the
first ``spec.setup_rows`` rows of the support split in ``setup_order`` and ship
:meth:`DenseFeaturizer.setup_state` (two arrays: the serialised index and the latents) as the
setup artifact; each actor then calls :meth:`DenseFeaturizer.load_setup_state` once and
:meth:`DenseFeaturizer.featurize` per batch, and hands the :class:`DenseBatch` to
:func:`fungi_ops.dense_table.dense_batch_columns` and
:func:`fungi_ops.dense_table.write_dense_parquet`.

Deliberate differences from the reference:

* the reference gathers the neighbours with ``memory[idx].reshape(B, T, E, -1)`` on an
  ``[B*T, N, E]`` array, which interleaves the coordinates of a token's neighbours; here
  every negative is the latent of one support patch;
* its loss runs in float16; here in float64, like the global features;
* its support is its HummingBird memory bank (label-aware sampling of augmented crops of
  the VOC train split); here unlabelled patches of the un-augmented view, sampled
  uniformly, so that any image lake can provide one.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import fungi_ops.featurizer as featurizer_module
from fungi_ops.adapters import DEFAULT_MAX_IMAGE_PIXELS, host_buffer, to_device
from fungi_ops.adapters.image import ImageAdapter
from fungi_ops.backbones import ImageInput
from fungi_ops.backbones import Backbone, resolve_target_layer
from fungi_ops.errors import ConfigError, SampleError
from fungi_ops.featurizer import FeaturizerBase
from fungi_ops.gradients import LinearGradientTap, token_linear_gradients
from fungi_ops.neighbours import NeighbourIndex
from fungi_ops.objectives import DenseConfig, DenseObjective
from fungi_ops.projection import RandomProjection
from fungi_ops.seeding import generator, setup_order
from fungi_ops.spec import FeaturizerSpec

log = logging.getLogger(__name__)

PROJECTION_ELEMENTS = {"cpu": 1 << 25, "accelerator": 1 << 28}
"""Values of rank-one gradients formed at once before projection (``rows x gradient_dim``).

Every chunk streams the whole projection matrix through the cache, so bigger chunks are
faster: on this project's 2-core CPU, 784 ViT-Tiny patches projected in chunks of 56, 226
and 784 rows took 132, 79 and 41 ms per 196 patches; 392 ViT-S patches in chunks of 56,
226 and 392 rows 470, 320 and 300 ms. CPU: 32 Mi float32 values (128 MiB), i.e. 905
patches of ViT-Tiny, 226 of ViT-S, 56 of ViT-B; accelerators: 256 Mi values (512 MiB in bf16).
"""
LATENT_CHUNK = 65536  # support rows per head matmul when the support is installed


@dataclass
class DenseBatch:
    """Per-patch features of the rows that succeeded, and an error for each row that failed.

    ``features[name]`` is ``[n_ok, patches, dim]`` float32, rows in input order without the
    failed ones; ``grid`` is the ``(rows, cols)`` patch grid shared by every image.
    """

    keys: list[str]
    grid: tuple[int, int]
    features: dict[str, np.ndarray]
    errors: dict[int, SampleError] = field(default_factory=dict)

    @property
    def ok_rows(self) -> list[int]:
        """Indices (into the input batch) of the rows that have features, in order."""
        return [i for i in range(len(self.keys)) if i not in self.errors]


class DenseDecoder:
    """Decode an encoded image to the dense view: uint8 ``[S, S, 3]``, the whole image resized.

    Holds no model, so that decode workers can run it; see :func:`make_dense_decoder`.
    """

    def __init__(self, image_size: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.image_size = int(image_size)
        # the global adapter's decoding (bit depths, alpha, the pixel limit; big JPEGs reduced
        # while decoding down to the view's side at least)
        self._images = ImageAdapter(ImageInput(input_size=self.image_size, crop_pct=1.0), max_pixels=max_pixels)

    def decode(self, payload: Any) -> np.ndarray:
        """Encoded image bytes (or an RGB array) -> uint8 ``[S, S, 3]``; SampleError for a bad row."""
        image = self._images.open_rgb(payload)
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.BICUBIC, reducing_gap=None)
        return np.asarray(image, dtype=np.uint8)


def make_dense_decoder(spec: FeaturizerSpec, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> DenseDecoder:
    """The decoder of a resolved dense spec (its ``image_size`` filled by :func:`~fungi_ops.featurizer.resolve_spec`)."""
    config = dense_config(spec)
    if config.image_size is None:
        raise ConfigError("dense spec is not resolved: image_size is unset")
    return DenseDecoder(config.image_size, max_image_pixels)


def patch_grid(spec: FeaturizerSpec, backbone: Backbone) -> tuple[int, int]:
    """``(rows, cols)`` of the patch grid of a resolved dense spec on its backbone (the view is square)."""
    config, tokens = dense_config(spec), backbone.patch_tokens
    if config.image_size is None or tokens is None:
        raise ConfigError("dense spec is not resolved for this backbone: run fungi_ops.featurizer.resolve_spec")
    side = config.image_size // tokens.patch_size
    return side, side


def dense_config(spec: FeaturizerSpec) -> DenseConfig:
    """The :class:`~fungi_ops.objectives.DenseConfig` of a dense spec; ConfigError for another spec."""
    if not spec.is_dense:
        raise ConfigError("not a dense spec: its objectives are " + ", ".join(o.name for o in spec.objectives))
    config = spec.objectives[0]
    assert isinstance(config, DenseConfig)
    return config


class DenseFeaturizer(FeaturizerBase):
    """Load a frozen ViT once, then compute per-patch features of batches of decoded images.

    ``spec`` must hold the ``dense`` objective alone. ``device``: default CUDA when
    available. ``projection``: an explicit ``[k, d]`` matrix instead of the seeded one.
    Before :meth:`featurize`, build the support with :meth:`setup` or install a saved one
    (:meth:`load_setup`, :meth:`load_setup_state`).
    """

    def __init__(
        self,
        spec: FeaturizerSpec,
        *,
        device: str | torch.device | None = None,
        projection: torch.Tensor | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        dense_config(spec)  # refuse other specs before loading anything
        self._load_model(spec, device, trust_remote_code)
        self.config = dense_config(self.spec)
        tokens = self.backbone.patch_tokens
        assert tokens is not None and self.config.image_size is not None  # checked by resolve_spec
        self.tokens = tokens
        self.image_size = self.config.image_size
        self.grid = patch_grid(self.spec, self.backbone)
        tokens.resize(self.backbone.model, self.image_size)
        _, layer = resolve_target_layer(self.backbone.model, self.spec.target_layer, self.backbone.default_target)
        self.backbone.model.to(self.device)
        self.decoder = DenseDecoder(self.image_size)
        settings = self.backbone.input_config
        self._mean = torch.tensor(settings.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(settings.std, device=self.device).view(1, 3, 1, 1) * 255.0
        # float64 heads and loss, as the global featurizer (see its comment); MPS has none
        self.loss_dtype = torch.float32 if self.device.type == "mps" else torch.float64
        objective = self.config.build(self.backbone.embed_dim, self.spec.modality, self.spec.seed)
        assert isinstance(objective, DenseObjective)
        self.objective = objective.to(self.device, self.loss_dtype)
        self.tap = LinearGradientTap(layer)
        self.compute_dtype = torch.bfloat16 if self.spec.precision == "bf16" or (
            self.spec.precision == "auto" and self.device.type == "cuda"
        ) else torch.float32
        self.projection = RandomProjection.for_featurizer(
            self.spec.projection_dim, self.tap.gradient_dim, self.spec.seed, dtype=self.compute_dtype,
            device=self.device, explicit=projection,
        )
        self.support: NeighbourIndex | None = None
        self.support_latents: torch.Tensor | None = None
        self._buffer: torch.Tensor | None = None
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())  # an actor's share of the cores, as torch's

    # -- shapes and names ---------------------------------------------------------
    @property
    def patches(self) -> int:
        """Patches per image: ``grid rows x grid cols``."""
        return self.grid[0] * self.grid[1]

    @property
    def feature_names(self) -> list[str]:
        """Output columns in order: ``embedding`` then ``grad_dense``."""
        return self.spec.feature_names

    @property
    def feature_dims(self) -> dict[str, int]:
        """Width of each per-patch feature: the token size, and ``projection_dim``."""
        return {"embedding": self.backbone.embed_dim, "grad_dense": self.spec.projection_dim}

    def decode(self, payload: Any) -> np.ndarray:
        """Encoded image bytes -> the dense view, uint8 ``[S, S, 3]``; SampleError for a bad row."""
        return self.decoder.decode(payload)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.compute_dtype == torch.bfloat16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def views(self, samples: Sequence[np.ndarray]) -> torch.Tensor:
        """Normalised ``[B, 3, S, S]`` float32 pixels of decoded samples, on the device."""
        side = self.image_size
        for sample in samples:
            if tuple(sample.shape) != (side, side, 3):
                raise ValueError(f"dense samples must be decoded to [{side}, {side}, 3], got {tuple(sample.shape)}")
        host = host_buffer((len(samples), side, side, 3), torch.uint8, self.device)  # pinned for CUDA
        np.stack(samples, out=host.numpy())
        pixels = to_device(host, self.device).permute(0, 3, 1, 2).float()
        return ((pixels - self._mean) / self._std).contiguous()

    def _forward_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, prefix + patches, D]`` tokens, in row chunks on the CPU (see ``CPU_FORWARD_ELEMENTS``)."""
        count = self.tokens.prefix + self.patches
        rows = pixels.shape[0]
        if self.device.type == "cpu":
            rows = max(1, featurizer_module.CPU_FORWARD_ELEMENTS // (count * self.tap.layer.in_features))
        tokens = torch.cat([self.tokens.forward(self.backbone.model, chunk) for chunk in pixels.split(rows)])
        if tokens.shape[1] != count:
            raise ConfigError(
                f"{self.spec.model} gives {tokens.shape[1]} tokens at {self.image_size} px, expected "
                f"{self.tokens.prefix} + {self.grid[0]}x{self.grid[1]}"
            )
        return tokens

    # -- support -----------------------------------------------------------------
    @property
    def needs_setup(self) -> bool:
        """True until a support index is built (:meth:`setup`) or loaded."""
        return self.support is None

    @torch.no_grad()
    def support_vectors(self, samples: Sequence[np.ndarray], keys: Sequence[str], batch_size: int = 8) -> dict[str, np.ndarray]:
        """The support patches of decoded images: key -> ``[support_patches_per_image, D]`` unit-norm float32.

        Each image's patches are drawn from ``(seed, "support", key)``, so any worker may
        compute any image; :meth:`install_support` orders and trims the blocks.
        """
        per_image = min(self.config.support_patches_per_image, self.patches)
        blocks: dict[str, np.ndarray] = {}
        for start in range(0, len(samples), batch_size):
            chunk_keys = [str(k) for k in keys[start : start + batch_size]]
            with self._autocast():
                tokens = self._forward_tokens(self.views(samples[start : start + batch_size]))
            patches = F.normalize(tokens[:, self.tokens.prefix :].float(), dim=-1).cpu()
            for row, key in enumerate(chunk_keys):
                chosen = torch.randperm(self.patches, generator=generator(self.spec.seed, "support", key))[:per_image]
                blocks[key] = patches[row, chosen.sort().values].numpy()
        return blocks

    @torch.no_grad()
    def install_support(self, blocks: Mapping[str, np.ndarray]) -> None:
        """Build the support from :meth:`support_vectors` blocks of any images, in any order.

        Images are taken in :func:`~fungi_ops.seeding.setup_order` of their keys until
        ``support_size`` patches are reached; the last image may be cut. Fewer patches than
        ``support_size`` is allowed (logged). Raises ConfigError for an empty support.
        """
        keys = list(blocks)
        if not keys:
            raise ConfigError("the dense support needs at least one image")
        ordered = [blocks[keys[i]] for i in setup_order(self.spec.seed, keys)]
        vectors = np.concatenate(ordered)[: self.config.support_size]
        if vectors.shape[0] < self.config.num_neighbors:
            raise ConfigError(f"the dense support has {vectors.shape[0]} patches, fewer than num_neighbors")
        if vectors.shape[0] < self.config.support_size:
            log.warning("dense support: %d patches from %d images (support_size %d)", vectors.shape[0], len(keys), self.config.support_size)
        index = NeighbourIndex.build(vectors, self.config.index, seed=self.spec.seed, probe=self.config.index_probe)
        latents = torch.empty((vectors.shape[0], self.config.latent_dim), dtype=torch.float32)
        for start in range(0, vectors.shape[0], LATENT_CHUNK):
            rows = torch.from_numpy(vectors[start : start + LATENT_CHUNK]).to(self.device, self.loss_dtype)
            latents[start : start + rows.shape[0]] = self.objective.latents(rows).float().cpu()
        self._install(index, latents)

    def setup(self, samples: Sequence[np.ndarray], keys: Sequence[str], batch_size: int = 8) -> None:
        """Build the support from decoded images of a training split (in-process; see the module docstring)."""
        self.install_support(self.support_vectors(samples, keys, batch_size))

    def _install(self, index: NeighbourIndex, latents: torch.Tensor) -> None:
        if index.dim != self.backbone.embed_dim or tuple(latents.shape) != (index.size, self.config.latent_dim):
            raise ConfigError(
                f"dense support does not fit: index of {index.size} x {index.dim}, latents {tuple(latents.shape)}; "
                f"expected dim {self.backbone.embed_dim} and latents [n, {self.config.latent_dim}]"
            )
        self.support, self.support_latents = index, latents

    def setup_state(self) -> dict[str, torch.Tensor]:
        """``dense.index`` (the serialised faiss index, uint8) and ``dense.latents`` ``[n, latent_dim]``."""
        if self.support is None or self.support_latents is None:
            raise ConfigError("no dense support to save: run DenseFeaturizer.setup() first")
        return {"dense.index": torch.from_numpy(self.support.to_bytes()), "dense.latents": self.support_latents.contiguous()}

    def load_setup_state(self, state: Mapping[str, Any]) -> None:
        """Install a state of :meth:`setup_state` (tensors or numpy arrays, e.g. from the object store)."""
        missing = [name for name in ("dense.index", "dense.latents") if name not in state]
        if missing:
            raise ConfigError(f"setup artifact has no {', '.join(missing)}")
        raw = state["dense.index"]
        index = NeighbourIndex.from_bytes(raw.numpy() if isinstance(raw, torch.Tensor) else raw, probe=self.config.index_probe)
        latents = state["dense.latents"]
        # copies: arrays from the object store are read-only, tensors may be shared
        latents = latents.detach().clone() if isinstance(latents, torch.Tensor) else torch.tensor(latents)
        self._install(index, latents.float())

    # -- features ----------------------------------------------------------------
    def featurize(self, samples: Sequence[np.ndarray], keys: Sequence[str]) -> DenseBatch:
        """Per-patch features of decoded samples. A row whose features are not finite is reported, not returned.

        ``keys``: the samples' content keys, which seed their negatives' draws (see
        :meth:`Featurizer.featurize <fungi_ops.featurizer.Featurizer.featurize>`).
        """
        if len(samples) != len(keys):
            raise ValueError(f"{len(samples)} samples but {len(keys)} keys")
        keys = [str(k) for k in keys]
        if not samples:
            empty = {name: np.zeros((0, self.patches, dim), np.float32) for name, dim in self.feature_dims.items()}
            return DenseBatch(keys, self.grid, empty)
        features = self.featurize_pixels(self.views(samples), keys)
        finite = np.all([np.isfinite(values).all(axis=(1, 2)) for values in features.values()], axis=0)
        errors = {
            int(i): SampleError("features are not finite (NaN/inf in the model output or gradient)", stage="featurize")
            for i in np.flatnonzero(~finite)
        }
        if errors:
            features = {name: values[finite] for name, values in features.items()}
        return DenseBatch(keys, self.grid, features, errors)

    def featurize_pixels(self, pixels: torch.Tensor, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """``{"embedding": [B, P, D], "grad_dense": [B, P, k]}`` of normalised views (:meth:`views`)."""
        if self.support is None:
            raise ConfigError("dense features need a support index: run DenseFeaturizer.setup() or load a setup artifact")
        self.tap.armed = True
        try:
            with torch.enable_grad(), self._autocast():
                tokens = self._forward_tokens(pixels)
                negatives, keep = self._negatives(tokens.detach(), keys)
                loss = self.objective.loss(tokens.to(self.loss_dtype), negatives, keep).sum()
            output_grads = torch.autograd.grad(loss, self.tap.outputs)
            gradients = self._patch_gradients(self.tap.inputs, output_grads)
        finally:
            self.tap.armed = False
            self.tap.clear()
        embedding = F.normalize(tokens[:, self.tokens.prefix :].detach().float(), dim=-1)
        gradients = F.normalize(gradients, dim=-1).view(len(keys), self.patches, -1)
        return {"embedding": embedding.cpu().numpy(), "grad_dense": gradients.cpu().numpy()}

    def _negatives(self, tokens: torch.Tensor, keys: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, T*N, L] neighbour latents, [B, T*N] kept)``: one support search per image."""
        assert self.support is not None and self.support_latents is not None
        count = self.config.num_neighbors
        unit = F.normalize(tokens.float(), dim=-1).cpu().numpy()
        latents, keep = [], []
        for row, key in enumerate(keys):
            _, indices = self.support.search(unit[row], count)
            latents.append(self.support_latents[torch.from_numpy(indices.reshape(-1))])
            draws = torch.rand(indices.size, generator=generator(self.spec.seed, "dense-negatives", key), dtype=torch.float64)
            keep.append(draws < self.config.negative_fraction)
        return torch.stack(latents).to(self.device, self.loss_dtype), torch.stack(keep).to(self.device)

    def _patch_gradients(self, inputs: Sequence[torch.Tensor], output_grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """Projected ``[B * P, k]`` rank-one gradients of every patch token, in row-major patch order."""
        prefix, bias = self.tokens.prefix, self.tap.has_bias
        x = torch.cat([chunk[:, prefix:] for chunk in inputs]).flatten(0, 1)
        g = torch.cat([chunk[:, prefix:] for chunk in output_grads]).flatten(0, 1)
        budget = PROJECTION_ELEMENTS["cpu" if self.device.type == "cpu" else "accelerator"]
        rows = max(1, min(x.shape[0], budget // self.tap.gradient_dim))
        buffer = self._gradient_buffer(rows)
        projected = torch.empty((x.shape[0], self.projection.out_dim), dtype=torch.float32, device=self.device)
        for start in range(0, x.shape[0], rows):
            stop = min(x.shape[0], start + rows)
            flat = token_linear_gradients(x[start:stop], g[start:stop], bias, out=buffer)
            projected[start:stop] = self.projection(flat)
        return projected

    def _gradient_buffer(self, rows: int) -> torch.Tensor:
        """A ``[>= rows, out, in + bias]`` buffer kept between batches: a fresh one per batch
        costs its page faults again (measured: the outer products of 784 ViT-Tiny patches took
        48 ms into a new buffer, 8 ms into a used one)."""
        out_features, in_features = self.tap.layer.weight.shape
        if self._buffer is None or self._buffer.shape[0] < rows:
            shape = (rows, out_features, in_features + int(self.tap.has_bias))
            self._buffer = None  # free the old one before allocating
            self._buffer = torch.empty(shape, dtype=self.compute_dtype, device=self.device)
        return self._buffer
