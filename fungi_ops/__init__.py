"""fungi_ops: the Ray-free PyTorch core of fungi.

FUNGI features (Simoncini et al., "No Train, all Gain", NeurIPS 2024): for each
input, the gradient of a self-supervised loss with respect to one ``nn.Linear`` of a
frozen encoder, randomly projected and L2-normalised, next to the model's embedding.

Typical use::

    from fungi_ops import Featurizer, FeaturizerSpec, parse_objectives

    spec = FeaturizerSpec(model="hf:sentence-transformers/all-MiniLM-L6-v2", modality="text",
                          objectives=parse_objectives("kl,simclr"))
    featurizer = Featurizer(spec)
    featurizer.setup(negative_texts, negative_ids)     # SimCLR negatives
    batch = featurizer.featurize_payloads(texts, ids)  # batch.features["grad_kl"] ...

Per-patch (dense) features of ViTs: :class:`DenseFeaturizer` with the ``dense`` objective
(:class:`DenseConfig`); see :mod:`fungi_ops.dense`.
"""
from fungi_ops.dense import DenseBatch, DenseFeaturizer
from fungi_ops.errors import ConfigError, FungiError, SampleError
from fungi_ops.featurizer import FeatureBatch, Featurizer
from fungi_ops.objectives import (
    OBJECTIVES,
    DenseConfig,
    DINOConfig,
    KLConfig,
    Objective,
    ObjectiveConfig,
    SimCLRConfig,
    register_objective,
)
from fungi_ops.spec import FeaturizerSpec, parse_objectives

__all__ = [
    "OBJECTIVES",
    "ConfigError",
    "DINOConfig",
    "DenseBatch",
    "DenseConfig",
    "DenseFeaturizer",
    "FeatureBatch",
    "Featurizer",
    "FeaturizerSpec",
    "FungiError",
    "KLConfig",
    "Objective",
    "ObjectiveConfig",
    "SampleError",
    "SimCLRConfig",
    "parse_objectives",
    "register_objective",
]
