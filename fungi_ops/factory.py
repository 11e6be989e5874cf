"""The one place that picks a spec's featurizer and decoder: dense (per-patch) or global.

Both choices depend on ``spec.is_dense`` alone. Here, above :mod:`fungi_ops.featurizer`,
:mod:`fungi_ops.dense` and :mod:`fungi_ops.adapters`, they need neither of those modules to
know the other (the dense featurizer builds on the global one's base and adapters).
"""
from __future__ import annotations

from typing import Any

from fungi_ops.adapters import DEFAULT_MAX_IMAGE_PIXELS, make_decoder
from fungi_ops.dense import DenseFeaturizer, make_dense_decoder
from fungi_ops.featurizer import Featurizer, FeaturizerBase
from fungi_ops.spec import FeaturizerSpec


def make_featurizer(spec: FeaturizerSpec, **options: Any) -> FeaturizerBase:
    """The featurizer of a spec: :class:`~fungi_ops.dense.DenseFeaturizer` for a dense one, else
    :class:`~fungi_ops.featurizer.Featurizer`.

    ``options`` go to the constructor (``device``, ``projection``, ``trust_remote_code``).
    Both load the model once and share :class:`~fungi_ops.featurizer.FeaturizerBase` (setup
    state, ``featurize``, ``featurize_payloads``), so a caller that only moves rows (the
    pipeline's actors and setup task) picks one here and treats both alike.
    """
    if spec.is_dense:
        return DenseFeaturizer(spec, **options)
    return Featurizer(spec, **options)


def make_spec_decoder(spec: FeaturizerSpec, input_config: Any, *, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Any:
    """The decoder of a resolved spec's rows, for workers that hold no model.

    A dense spec's rows are decoded to its square view (:func:`fungi_ops.dense.make_dense_decoder`),
    any other spec's by its modality's adapter (:func:`fungi_ops.adapters.make_decoder`,
    ``input_config`` the backbone's). Either has ``decode(payload)``, raising SampleError for a
    bad row, and pickles (a job builds it once where the model is loaded and ships it to its
    decode tasks).
    """
    if spec.is_dense:
        return make_dense_decoder(spec, max_image_pixels)
    return make_decoder(spec.modality, input_config, max_image_pixels=max_image_pixels)
