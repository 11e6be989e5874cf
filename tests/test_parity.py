"""Parity with the reference implementation, fungivision 0.0.2, on identical inputs.

Both implementations get the same model (timm's small ``test_vit``, random init), the
same heads, projection and SimCLR negatives, and the same model-ready views: fungivision's
own KL transform for the eval view, its Patchify for the SimCLR views, and one fixed set
of DINO crops. fungivision scales projected gradients by 1/sqrt(d) where we L2-normalise,
so normalised outputs are compared.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fungi_ops import Featurizer, FeaturizerSpec, parse_objectives

pytest.importorskip("fungivision")
# fungivision uses APIs that torch/torchvision now deprecate (cuda.amp on CPU, non-full
# backward hooks, ToTensor, kl_div 'mean'); they work as it expects.
pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore:The transform `ToTensor\\(\\)` is deprecated:UserWarning"),
    pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning"),
]

BATCH = 2
NEGATIVES = 32


@pytest.fixture(scope="module")
def engine() -> Featurizer:
    spec = FeaturizerSpec(
        model="timm:test_vit",
        modality="image",
        weights="random",
        objectives=parse_objectives("kl,dino,simclr"),
        precision="fp32",
        seed=3,
    )
    featurizer = Featurizer(spec, device="cpu")
    negatives = torch.randn(NEGATIVES, featurizer.objectives["simclr"].config.latent_dim, generator=torch.Generator().manual_seed(5))
    featurizer.objectives["simclr"].set_negatives(negatives)
    return featurizer


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(11)
    # smooth-ish content so that crops differ in more than noise
    shapes = [(90, 120), (150, 100)]
    return [
        Image.fromarray(np.kron(rng.integers(0, 256, (h // 10, w // 10, 3), dtype=np.uint8), np.ones((10, 10, 1), np.uint8)))
        for h, w in shapes
    ]


@pytest.fixture(scope="module")
def reference(engine: Featurizer) -> dict:
    """fungivision's three extractors on a copy of our model, with our heads and projection."""
    from fungivision.config import DINOConfig, KLConfig, SimCLRConfig
    from fungivision.utils import autograd_hacks
    from fungivision.utils.misc import freeze_model

    target = engine.spec.target_layer
    model = copy.deepcopy(engine.backbone.model)
    for module in model.modules():  # the copy must not carry our gradient tap
        module._forward_hooks.clear()
    freeze_model(model, exclusions=[target])
    autograd_hacks.add_hooks(model, layer_paths=[target])
    projection = engine.projection.matrix.clone()
    base = {
        "model": model,
        "target_layer": target,
        "device": torch.device("cpu"),
        "projection": projection,
        "projection_scaling": 1.0 / math.sqrt(projection.shape[1]),
        "embeddings_dim": engine.backbone.embed_dim,
        "input_dim": engine.adapter.settings.input_size,
        "use_fp16": False,
    }
    ours = engine.objectives
    extractors = {
        "kl": KLConfig(temperature=ours["kl"].config.temperature).get_extractor(base),
        "dino": DINOConfig(**{k: getattr(ours["dino"].config, k) for k in ("teacher_temperature", "student_temperature", "latent_dim")}).get_extractor(base),
        "simclr": SimCLRConfig(temperature=ours["simclr"].config.temperature, latent_dim=ours["simclr"].config.latent_dim).get_extractor(base),
    }
    with torch.no_grad():
        for name, extractor in extractors.items():
            extractor.projection_head.load_state_dict(ours[name].head.state_dict())
        extractors["dino"].teacher_projection.load_state_dict(ours["dino"].teacher_head.state_dict())
    extractors["simclr"].comparison_batch = ours["simclr"].negatives.clone()
    return extractors


@pytest.fixture(scope="module")
def views(engine: Featurizer, images: list[Image.Image], reference: dict) -> dict[str, torch.Tensor]:
    """Per objective, ``[B, V, 3, S, S]`` views built by fungivision's own transforms."""
    from fungivision.gradients.dino.transforms import DINOTransform
    from fungivision.gradients.simclr.transforms import Patchify

    size = engine.adapter.settings.input_size
    config = engine.objectives["simclr"].config
    evaluation = reference["kl"].input_transform(input_dim=size)
    patchify = Patchify(num_patches=config.num_patches, image_size=size, stride_scale=config.stride_scale)
    dino = DINOTransform(crops_size=size)
    torch.manual_seed(0)  # one fixed draw of DINO crops, fed to both implementations
    return {
        "kl": torch.stack([evaluation(image) for image in images])[:, None],
        "dino": torch.stack([dino(image) for image in images]),
        "simclr": torch.stack([patchify(image) for image in images]),
    }


@pytest.fixture(scope="module")
def ours(engine: Featurizer, views: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    kinds = {"eval": "kl", "multicrop": "dino", "contrastive": "simclr"}
    inputs = torch.cat([views[kinds[group.kind]].flatten(0, 1) for group in engine.groups])
    return engine.featurize_views(inputs, BATCH)


def theirs(extractor, views: torch.Tensor) -> np.ndarray:
    """Run a fungivision extractor on fixed views (its transform looks them up by index)."""
    extractor.transform = lambda index: views[index] if views.shape[1] > 1 else views[index, 0]
    projected = extractor(images=list(range(views.shape[0])))
    return torch.nn.functional.normalize(projected.detach().float(), dim=-1).numpy()


def test_view_layout_matches_groups(engine: Featurizer, views: dict[str, torch.Tensor]) -> None:
    counts = {group.kind: group.count for group in engine.groups}
    assert views["dino"].shape[1] == counts["multicrop"] == 12
    assert views["simclr"].shape[1] == counts["contrastive"] == 49


@pytest.mark.parametrize("objective", ["kl", "dino", "simclr"])
def test_gradients_match_fungivision(objective: str, ours, reference, views) -> None:
    expected = theirs(reference[objective], views[objective])
    got = ours[f"grad_{objective}"]
    assert got.shape == expected.shape == (BATCH, reference[objective].projection.shape[0])
    cosine = (got * expected).sum(axis=1)
    assert cosine.min() >= 0.9999, cosine
    # and the two samples' features are not the same vector
    assert abs(float(got[0] @ got[1])) < 0.999


def test_simclr_loss_matches_fungivision(engine: Featurizer, reference) -> None:
    """Our InfoNCE with scale_denominator=False is the reference's per-sample loss.

    The reference's ``P - diag(P)`` subtracts each column's masked self-similarity
    (-1e4 / T) rather than zeroing the diagonal, which adds the constant 1e4 / T to its
    loss; the gradients, hence the features, are the same.
    """
    config = engine.objectives["simclr"].config
    assert config.scale_denominator is False
    objective = config.build(engine.backbone.embed_dim, "image", engine.spec.seed)
    objective.set_negatives(engine.objectives["simclr"].negatives)
    objective.head = torch.nn.Identity()  # feed head outputs (latents) directly
    latents = torch.randn(BATCH, 6, config.latent_dim, generator=torch.Generator().manual_seed(2), requires_grad=True)
    ours = objective.loss(latents)
    theirs = torch.stack([reference["simclr"].info_nce_loss(sample) for sample in latents])
    torch.testing.assert_close(ours - theirs, torch.full((BATCH,), 1e4 / config.temperature), rtol=1e-6, atol=0.05)
    (grad_ours,) = torch.autograd.grad(ours.sum(), latents)
    (grad_theirs,) = torch.autograd.grad(theirs.sum(), latents)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-4, atol=1e-6)
