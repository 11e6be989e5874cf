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
from __future__ import annotations

from fungi_ops._lazy import lazy_exports

# Public names and the modules that define them. Imported on first use (PEP 562), so that
# ``fungi_ops.errors`` and the like load without torch: the pipeline's driver imports them
# and stays a few hundred MB lighter.
_EXPORTS = {
    "ConfigError": "fungi_ops.errors",
    "FungiError": "fungi_ops.errors",
    "SampleError": "fungi_ops.errors",
    "DenseBatch": "fungi_ops.dense",
    "DenseFeaturizer": "fungi_ops.dense",
    "FeatureBatch": "fungi_ops.featurizer",
    "Featurizer": "fungi_ops.featurizer",
    "make_featurizer": "fungi_ops.factory",
    "OBJECTIVES": "fungi_ops.objectives",
    "DenseConfig": "fungi_ops.objectives",
    "DINOConfig": "fungi_ops.objectives",
    "KLConfig": "fungi_ops.objectives",
    "Objective": "fungi_ops.objectives",
    "ObjectiveConfig": "fungi_ops.objectives",
    "SimCLRConfig": "fungi_ops.objectives",
    "register_objective": "fungi_ops.objectives",
    "FeaturizerSpec": "fungi_ops.spec",
    "parse_objectives": "fungi_ops.spec",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
