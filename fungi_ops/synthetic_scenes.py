"""Synthetic scenes with exact masks: regions of procedural textures, one texture per class.

For known-answer checks of dense features and of the segmentation protocol without any
download. A scene is a Voronoi partition of the image into ``regions`` cells around
random sites; each cell gets a class and is filled with that class' texture: oriented
sine stripes of a class-specific angle, frequency and pair of colours, with a random
phase per cell and a little pixel noise. The mask holds the class id of every pixel, so
it is exact; ``ignore_border`` marks pixels within that many pixels of a boundary between
two classes with 255, the ignore index (as VOC's object boundaries).

Everything is drawn from ``(seed, "scene", index)``: the same arguments give the same
scenes on any machine.
"""
from __future__ import annotations

import io
import math

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from fungi_ops.seeding import generator

IGNORE_INDEX = 255


def class_textures(classes: int) -> list[dict[str, object]]:
    """Texture parameters of each class: angle (rad), stripe period (px), two RGB colours."""
    textures = []
    for c in range(classes):
        hue = c / classes
        colour = np.array([math.cos(2 * math.pi * (hue + s / 3)) for s in range(3)])
        textures.append(
            {
                "angle": math.pi * ((c * 0.381966) % 1.0),
                "period": 4.0 + 3.0 * (c % 3),
                "colours": (127 + 110 * colour, 127 - 60 * colour),
            }
        )
    return textures


def make_scene(
    index: int, *, size: int = 64, classes: int = 4, regions: int = 3, seed: int = 0, ignore_border: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Scene ``index``: ``(image uint8 [size, size, 3], mask uint8 [size, size])``."""
    gen = generator(seed, "scene", index)
    draw = lambda *shape: torch.rand(shape, generator=gen, dtype=torch.float64).numpy()  # noqa: E731
    sites = draw(regions, 2) * size
    labels = (draw(regions) * classes).astype(np.int64)
    phases = draw(regions) * 2 * math.pi
    noise = draw(size, size, 3) - 0.5
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    distances = np.stack([np.hypot(ys - y, xs - x) for y, x in sites])  # [regions, H, W]
    nearest = np.argsort(distances, axis=0)[:2]  # the two nearest sites of every pixel
    cell = nearest[0]
    image = np.zeros((size, size, 3), dtype=np.float64)
    textures = class_textures(classes)
    for region in range(regions):
        texture = textures[labels[region]]
        angle, period = float(texture["angle"]), float(texture["period"])
        wave = 0.5 + 0.5 * np.sin(2 * math.pi * (xs * math.cos(angle) + ys * math.sin(angle)) / period + phases[region])
        first, second = texture["colours"]
        fill = wave[..., None] * first + (1 - wave[..., None]) * second
        image[cell == region] = fill[cell == region]
    image = np.clip(image + 24.0 * noise, 0, 255).astype(np.uint8)
    mask = labels[cell].astype(np.uint8)
    if ignore_border and regions > 1:
        # distance to the bisector of the two nearest sites: (d2^2 - d1^2) / (2 |s1 - s2|)
        first, second = np.take_along_axis(distances, nearest, axis=0)
        spacing = np.linalg.norm(sites[nearest[0]] - sites[nearest[1]], axis=-1)
        to_boundary = (second**2 - first**2) / np.maximum(2 * spacing, 1e-9)
        mask[(to_boundary < ignore_border) & (labels[nearest[0]] != labels[nearest[1]])] = IGNORE_INDEX
    return image, mask


def png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 ``[H, W, 3]`` image or ``[H, W]`` mask (mode L)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def scene_table(
    count: int, *, first: int = 0, size: int = 64, classes: int = 4, regions: int = 3, seed: int = 0, ignore_border: int = 0
) -> pa.Table:
    """Scenes ``first .. first + count - 1`` as a table: ``id`` (``scene-<i>``), ``image`` and ``mask`` PNG bytes."""
    ids, images, masks = [], [], []
    for index in range(first, first + count):
        image, mask = make_scene(index, size=size, classes=classes, regions=regions, seed=seed, ignore_border=ignore_border)
        ids.append(f"scene-{index}")
        images.append(png(image))
        masks.append(png(mask))
    return pa.table({"id": ids, "image": pa.array(images, pa.binary()), "mask": pa.array(masks, pa.binary())})
