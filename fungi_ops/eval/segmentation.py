"""In-context semantic segmentation of dense features: the HummingBird protocol.

HummingBird (Balazevic et al., NeurIPS 2023), as in the open implementation of Pariza et
al. that the FUNGI reference (``fungi-hummingbird``) builds on:

1. memory bank: from every train image, ``memory_size // n_train_images`` patches (at
   least one) with their label distribution, i.e. the class histogram of the patch's
   pixels. Patches are chosen as the reference does: score = sum, over the classes in the
   patch, of the number of the image's patches holding that class, times a uniform draw
   (stream ``(seed, "memory", id)``); the lowest scores are kept, favouring rare classes;
2. each test patch takes its ``k`` (30) nearest memory patches by cosine similarity
   (:class:`~fungi_ops.neighbours.NeighbourIndex`, ``auto``: exact up to
   :data:`~fungi_ops.neighbours.FLAT_LIMIT` memory patches, else 8-bit IVF, where the
   reference uses ScaNN) and their label distributions, weighted by
   ``softmax(cos / temperature)`` (0.02): cross-attention label transfer;
3. the patch grid of label scores is upsampled bilinearly to the mask's own size, the
   argmax is the prediction;
4. mIoU: per class, ``TP / (TP + FP + FN)`` over all test pixels whose truth is not
   ``ignore_index`` (255), averaged over the classes present in the truth or the
   predictions.

Features are compared as by the other tasks: each block L2-normalised, blocks
concatenated, normalised again (the reference concatenates tokens and gradients so).

Input: two dense feature tables (:mod:`fungi_ops.dense_table`, e.g. from
``DenseFeaturizer`` and ``dense_table``, or the pipeline) with the label mask kept as a
column of PNG bytes (single channel, mode ``L`` or ``P``, pixel value = class id,
``ignore_index`` for pixels to ignore), of any size: the features cover the whole image
(resized to a square), and the mask is mapped onto the patch grid by a nearest-neighbour
resize to ``grid x LABEL_BLOCK`` pixels a side. Tables are streamed: memory holds the
memory bank and one batch of test images.

Differences from the reference: label distributions leave ignored pixels out (the
reference counts them as background, VOC's class 0); a patch with no valid pixel is never
in the memory bank; the mIoU is computed at the mask's resolution (the reference resizes
masks to the model input) and averages the classes present (the reference's ``PredsmIoU``
also matches predicted to true classes with the Hungarian algorithm, which can only raise
its number, and averages all 21 VOC classes); there is no augmentation of train images.
"""
from __future__ import annotations

import io
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image

from fungi_ops.eval.dense_io import DenseReader, DenseRows
from fungi_ops.eval.combinations import combination_name, feature_combinations
from fungi_ops.eval.errors import EvalInputError, EvalWarning
from fungi_ops.eval.knn import clamp_k
from fungi_ops.eval.report import CombinationResult, EvalReport, MetricSummary
from fungi_ops.neighbours import INDEX_KINDS, NeighbourIndex, auto_kind
from fungi_ops.seeding import generator

DEFAULT_MEMORY_SIZE = 102400
DEFAULT_K = 30
DEFAULT_TEMPERATURE = 0.02
IGNORE_INDEX = 255
LABEL_BLOCK = 16
"""Mask pixels per patch side when label distributions are computed (the reference: the patch size, 16)."""
_LABELS = 256  # mask values are uint8


@dataclass(frozen=True)
class SegmentationExample:
    """One test image for the report's picture: its pixels (if kept), truth and predictions."""

    id: str
    image: np.ndarray | None
    truth: np.ndarray
    predictions: dict[str, np.ndarray]


@dataclass(frozen=True)
class SegmentationReport(EvalReport):
    """An :class:`~fungi_ops.eval.report.EvalReport` of task ``segmentation`` plus one example image.

    ``example`` is drawn by :meth:`figures` and left out of :meth:`to_dict`.
    """

    example: SegmentationExample | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary with every number (the example's pixels excluded)."""
        data = asdict(self)
        data.pop("example")
        return data

    def figures(self) -> dict[str, Figure]:
        """``{"example": figure}``: the query image, its truth and each combination's prediction."""
        if self.example is None:
            return {}
        return {"example": plot_example(self.example, self.settings.get("class_ids", []))}


def decode_mask(payload: Any, source: str, row_id: Any) -> np.ndarray:
    """PNG (or any single-channel image) bytes -> uint8 ``[H, W]`` class ids; EvalInputError otherwise."""
    if not isinstance(payload, (bytes, bytearray, memoryview)) or len(payload) == 0:
        raise EvalInputError(f"mask of id {row_id!r} in {source} is empty or not bytes")
    try:
        image = Image.open(io.BytesIO(bytes(payload)))
        image.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes
        raise EvalInputError(f"cannot decode the mask of id {row_id!r} in {source}: {exc}") from exc
    if image.mode not in ("L", "P", "I", "I;16"):
        raise EvalInputError(
            f"mask of id {row_id!r} in {source} is {image.mode}; masks hold one class id per pixel (PNG mode L or P)"
        )
    mask = np.asarray(image)
    if mask.max(initial=0) > IGNORE_INDEX:
        raise EvalInputError(f"mask of id {row_id!r} in {source} has values above 255")
    return mask.astype(np.uint8)


def patch_label_counts(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``[patches, 255]`` pixel counts of each class (ignore index left out) in each patch of ``grid``.

    The mask is resized (nearest) to ``grid * LABEL_BLOCK`` pixels a side, as the reference
    resizes it to the model input, and cut into the grid's cells.
    """
    rows, cols = grid
    resized = np.asarray(Image.fromarray(mask).resize((cols * LABEL_BLOCK, rows * LABEL_BLOCK), Image.NEAREST))
    cells = resized.reshape(rows, LABEL_BLOCK, cols, LABEL_BLOCK).transpose(0, 2, 1, 3).reshape(rows * cols, -1)
    keys = np.arange(rows * cols)[:, None] * _LABELS + cells.astype(np.int64)
    counts = np.bincount(keys.ravel(), minlength=rows * cols * _LABELS).reshape(rows * cols, _LABELS)
    return counts[:, :IGNORE_INDEX]


def memory_patches(counts: np.ndarray, count: int, seed: int, key: str) -> np.ndarray:
    """Indices of the ``count`` patches the reference keeps: rare classes first, ties broken at random."""
    present = counts > 0
    valid = present.any(axis=1)
    frequency = present.sum(axis=0)  # patches of the image holding each class
    uniform = torch.rand(len(counts), generator=generator(seed, "memory", key), dtype=torch.float64).numpy()
    score = np.where(valid, (present * frequency).sum(axis=1) * uniform, np.inf)
    order = np.argsort(score, kind="stable")
    return np.sort(order[: min(count, int(valid.sum()))])


def transfer_labels(similarities: np.ndarray, neighbour_labels: np.ndarray, temperature: float) -> np.ndarray:
    """``[queries, classes]`` label scores: the neighbours' distributions weighted by ``softmax(cos / T)``.

    ``similarities``: ``[queries, k]`` cosines; ``neighbour_labels``: ``[queries, k, classes]``.
    """
    weights = torch.softmax(torch.from_numpy(np.asarray(similarities, dtype=np.float64)) / temperature, dim=1)
    return torch.einsum("qk,qkc->qc", weights, torch.from_numpy(np.asarray(neighbour_labels, dtype=np.float64))).numpy()


def predict_mask(scores: np.ndarray, grid: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """Class map ``shape`` (H, W): the ``[patches, classes]`` scores upsampled bilinearly, then argmax."""
    grid_scores = torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32)).T.reshape(1, -1, *grid)
    upsampled = F.interpolate(grid_scores, size=shape, mode="bilinear", align_corners=False)
    return upsampled[0].argmax(dim=0).numpy().astype(np.int64)


def update_confusion(confusion: np.ndarray, truth: np.ndarray, prediction: np.ndarray) -> None:
    """Add pixels to a ``[256, 256]`` (truth, prediction) count matrix; ``ignore_index`` truth is skipped."""
    valid = truth != IGNORE_INDEX
    keys = truth[valid].astype(np.int64) * _LABELS + prediction[valid]
    confusion += np.bincount(keys, minlength=_LABELS * _LABELS).reshape(_LABELS, _LABELS)


def miou(confusion: np.ndarray) -> tuple[float, dict[int, float]]:
    """``(mean IoU, {class: IoU})`` over the classes present in the truth or the predictions."""
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - tp
    classes = np.flatnonzero(union > 0)
    per_class = {int(c): float(tp[c] / union[c]) for c in classes}
    return (float(np.mean(list(per_class.values()))) if per_class else 0.0), per_class


def evaluate_segmentation(
    train: str | DenseReader,
    test: str | DenseReader,
    *,
    mask_column: str = "mask",
    image_column: str | None = "image",
    features: Sequence[str] | None = None,
    memory_size: int = DEFAULT_MEMORY_SIZE,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    index: str = "auto",
    seed: int = 0,
    batch_rows: int = 16,
) -> SegmentationReport:
    """HummingBird mIoU of every feature combination (see the module docstring).

    Args:
        train, test: dense feature tables (paths or :class:`~fungi_ops.eval.dense_io.DenseReader`)
            of the same spec, with ``mask_column``.
        image_column: column of the encoded image, drawn in the report's example when
            present; ``None`` draws truth and predictions only.
        features: dense columns to combine (default: all present in both).
        memory_size: memory bank patches; ``memory_size // n_train_images`` per image.
        k, temperature: neighbours per test patch and the cross-attention temperature.
        index: ``auto``, or a kind of :data:`~fungi_ops.neighbours.INDEX_KINDS`.
        seed: the memory bank's sampling stream.
        batch_rows: images read at a time.

    Raises:
        EvalInputError: unusable tables or options; the message says what and where.
    """
    check_segmentation_options(memory_size=memory_size, k=k, temperature=temperature, index=index)
    readers = [table if isinstance(table, DenseReader) else DenseReader(table) for table in (train, test)]
    train_reader, test_reader = readers
    columns = _columns(train_reader, test_reader, features)
    for reader in readers:
        if not reader.has_column(mask_column):
            raise EvalInputError(f"mask column {mask_column!r} not found in {reader.source}")
    draw_image = image_column is not None and test_reader.has_column(image_column)

    started = time.perf_counter()
    n_train = train_reader.n_rows
    per_image = max(1, memory_size // max(1, n_train))
    bank = _memory_bank(train_reader, columns, mask_column, per_image, seed, batch_rows)
    classes = bank["labels"].shape[1]
    effective_k = clamp_k(k, bank["labels"].shape[0])
    combos = feature_combinations(columns)
    kind = index if index != "auto" else auto_kind(bank["labels"].shape[0])
    indexes = {combination_name(c): NeighbourIndex.build(_combine(bank, c), kind, seed=seed) for c in combos}
    memory_seconds = time.perf_counter() - started

    confusions = {name: np.zeros((_LABELS, _LABELS), dtype=np.int64) for name in indexes}
    seconds = dict.fromkeys(indexes, 0.0)
    example: SegmentationExample | None = None
    n_test = 0
    extra = [mask_column, *([image_column] if draw_image else [])]
    for rows in test_reader.batches(columns, extra, batch_rows):
        for row in range(len(rows.ids)):
            truth = decode_mask(rows.columns[mask_column][row], test_reader.source, rows.ids[row])
            grid = (int(rows.grids[row, 0]), int(rows.grids[row, 1]))
            predictions = {}
            for combo in combos:
                name = combination_name(combo)
                tic = time.perf_counter()
                similarities, neighbours = indexes[name].search(_combine(_row_blocks(rows, row), combo), effective_k)
                scores = transfer_labels(similarities, bank["labels"][neighbours], temperature)
                predictions[name] = predict_mask(scores, grid, truth.shape)
                update_confusion(confusions[name], truth, predictions[name])
                seconds[name] += time.perf_counter() - tic
            if example is None:
                image = _decode_image(rows.columns[image_column][row]) if draw_image else None
                example = SegmentationExample(str(rows.ids[row]), image, truth, predictions)
            n_test += 1
    if n_test == 0:
        raise EvalInputError(f"feature table {test_reader.source} has no rows")

    unseen = sorted({int(c) for c in np.flatnonzero(next(iter(confusions.values())).sum(axis=1)) if c >= classes})
    if unseen:
        warnings.warn(
            f"test masks of {test_reader.source} hold classes {unseen} absent from the train masks; they count as errors",
            EvalWarning,
            stacklevel=2,
        )
    results = []
    for combo in combos:
        name = combination_name(combo)
        value, per_class = miou(confusions[name])
        truth_pixels, predicted_pixels = confusions[name].sum(axis=1), confusions[name].sum(axis=0)
        results.append(
            CombinationResult(
                name=name,
                columns=combo,
                input_dim=sum(bank[c].shape[1] for c in combo),
                dim=sum(bank[c].shape[1] for c in combo),
                metrics={"mIoU": MetricSummary.from_values([value])},
                details={
                    "class_iou": [{str(c): iou for c, iou in per_class.items()}],
                    "truth_pixels": [{str(c): int(truth_pixels[c]) for c in per_class}],
                    "predicted_pixels": [{str(c): int(predicted_pixels[c]) for c in per_class}],
                },
                seconds=seconds[name],
            )
        )
    settings = {
        "train": _split_settings(train_reader),
        "test": _split_settings(test_reader),
        "label_column": mask_column,
        "n_classes": int(classes),
        "class_ids": sorted({int(c) for c in np.flatnonzero(sum(confusions.values()).sum(axis=1))} | set(range(classes))),
        "features": list(columns),
        "memory_size": memory_size,
        "memory_patches": int(bank["labels"].shape[0]),
        "patches_per_train_image": per_image,
        "k": effective_k,
        "k_requested": k,
        "temperature": temperature,
        "index": kind,
        "ignore_index": IGNORE_INDEX,
        "seed": seed,
        "memory_seconds": memory_seconds,
        "pca": None,
        "shots": None,
        "seeds": [],
    }
    return SegmentationReport(
        task="segmentation", metric_names=("mIoU",), settings=settings, results=tuple(results), example=example
    )


def check_segmentation_options(*, memory_size: int, k: int, temperature: float, index: str) -> None:
    """Reject bad :func:`evaluate_segmentation` options before any table is read."""
    if memory_size < 1:
        raise EvalInputError(f"memory size must be positive, got {memory_size}")
    if k < 1:
        raise EvalInputError(f"k must be positive, got {k}")
    if temperature <= 0:
        raise EvalInputError(f"temperature must be positive, got {temperature}")
    if index != "auto" and index not in INDEX_KINDS:
        raise EvalInputError(f"index must be auto or one of {', '.join(INDEX_KINDS)}, got {index!r}")


def plot_example(example: SegmentationExample, class_ids: Sequence[int]) -> Figure:
    """Query image (when kept), its truth and each prediction side by side, one colour per class."""
    panels: list[tuple[str, np.ndarray]] = []
    if example.image is not None:
        panels.append(("image", example.image))
    palette = _palette(max([*class_ids, 0]) + 1)
    panels.append(("truth", _colour(example.truth, palette)))
    panels += [(name, _colour(mask, palette)) for name, mask in example.predictions.items()]
    figure = Figure(figsize=(3.0 * len(panels), 3.4), layout="constrained")
    for axes, (title, pixels) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        axes.imshow(pixels, interpolation="nearest")
        axes.set_title(title.replace("+", "+\n"), fontsize=8)
        axes.set_axis_off()
    figure.suptitle(f"test image {example.id}", fontsize=9)
    return figure


def _columns(train: DenseReader, test: DenseReader, features: Sequence[str] | None) -> list[str]:
    if train.spec_hash is not None and test.spec_hash is not None and train.spec_hash != test.spec_hash:
        raise EvalInputError(
            "train and test features come from different featurizer specs: "
            f"{train.source} has fungi.spec_hash={train.spec_hash}, {test.source} has fungi.spec_hash={test.spec_hash}"
        )
    common = [name for name in train.features if name in test.features]
    columns = common if features is None else list(features)
    for name in columns:
        for reader in (train, test):
            if name not in reader.features:
                raise EvalInputError(f"dense feature column {name!r} not found in {reader.source}; it has {', '.join(reader.features)}")
        if train.dims[name] != test.dims[name]:
            raise EvalInputError(f"feature column {name!r} has dimension {train.dims[name]} in {train.source} but {test.dims[name]} in {test.source}")
    if not columns:
        raise EvalInputError(f"{train.source} and {test.source} have no dense feature column in common")
    return [name for name in train.features if name in columns]


def _memory_bank(
    reader: DenseReader, columns: Sequence[str], mask_column: str, per_image: int, seed: int, batch_rows: int
) -> dict[str, np.ndarray]:
    """Sampled train patches: ``{column: [M, dim] unit rows, "labels": [M, classes] distributions}``."""
    blocks: dict[str, list[np.ndarray]] = {name: [] for name in columns}
    labels: list[np.ndarray] = []
    for rows in reader.batches(columns, [mask_column], batch_rows):
        for row in range(len(rows.ids)):
            mask = decode_mask(rows.columns[mask_column][row], reader.source, rows.ids[row])
            counts = patch_label_counts(mask, (int(rows.grids[row, 0]), int(rows.grids[row, 1])))
            chosen = memory_patches(counts, per_image, seed, str(rows.ids[row]))
            for name in columns:
                blocks[name].append(_unit(rows.patches(name, row)[chosen]))
            labels.append(counts[chosen])
    if not labels or sum(len(part) for part in labels) == 0:
        raise EvalInputError(f"no train patch of {reader.source} has a labelled pixel")
    counts = np.concatenate(labels).astype(np.float64)
    classes = int(np.flatnonzero(counts.sum(axis=0))[-1]) + 1
    distributions = counts[:, :classes] / counts.sum(axis=1, keepdims=True)
    bank = {name: np.concatenate(parts) for name, parts in blocks.items()}
    bank["labels"] = distributions.astype(np.float32)
    return bank


def _row_blocks(rows: DenseRows, row: int) -> dict[str, np.ndarray]:
    return {name: _unit(rows.patches(name, row)) for name in rows.features}


def _combine(blocks: dict[str, np.ndarray], combo: Sequence[str]) -> np.ndarray:
    """Unit blocks concatenated and normalised again: ``1 / sqrt(blocks)`` times the concatenation."""
    return np.concatenate([blocks[name] for name in combo], axis=1) / np.float32(math.sqrt(len(combo)))


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def _decode_image(payload: Any) -> np.ndarray | None:
    try:
        return np.asarray(Image.open(io.BytesIO(bytes(payload))).convert("RGB"))
    except Exception:  # noqa: BLE001 - the picture is a courtesy; a bad image only drops its panel
        return None


def _palette(classes: int) -> np.ndarray:
    from matplotlib import colormaps

    colours = (np.asarray(colormaps["tab20"](np.arange(max(classes, 1)) % 20))[:, :3] * 255).astype(np.uint8)
    return np.concatenate([colours, np.zeros((_LABELS - len(colours), 3), np.uint8)])


def _colour(mask: np.ndarray, palette: np.ndarray) -> np.ndarray:
    pixels = palette[np.minimum(mask, _LABELS - 1)]
    pixels[mask == IGNORE_INDEX] = 255  # ignored pixels in white
    return pixels


def _split_settings(reader: DenseReader) -> dict[str, Any]:
    return {"source": reader.source, "rows": reader.n_rows, "spec_hash": reader.spec_hash, "spec": reader.spec}
