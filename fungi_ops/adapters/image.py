"""Images: decode to a bounded uint8 array, then cut every view as a box of it.

All views (the eval centre crop, DINO's random resized crops, SimCLR's overlapping
patches) are boxes in the decoded image resized to the model's input side. They are
sampled for the whole batch with a single bilinear ``grid_sample`` on the model's
device, instead of one PIL transform per view (bilinear: 5x cheaper than bicubic on
CPU, measured, and exact at the integer positions of the eval crop up to the float32
rounding of grid coordinates). The image is decoded with its shorter side at the
model's eval resize (``input_size / crop_pct``), so the eval view is a centre crop and
the other boxes are resampled by less than ~1.2x, where the lack of antialiasing in
``grid_sample`` is immaterial. Only the random draws of a view are made per sample;
box geometry and the sampling grid are computed for the whole batch.

Decoding gives 8-bit RGB whatever the file holds, and never clips silently
(``convert("RGB")`` saturates 16-bit and float images):

* 16-bit samples keep their high byte (``v >> 8``): grey 16-bit PNG/TIFF/PGM (Pillow modes
  ``I;16*``, or ``I`` with values in 0..65535) here, 16-bit RGB(A) PNG/TIFF by Pillow
  itself, which decodes them to 8 bits that way. So one rule holds for every 16-bit file:
  within one level of ``v / 257``, exact for 8-bit data stored in 16 bits. ``I`` values
  outside 0..65535 (signed or 32-bit data) and float images (``F``) have no defined range
  and are refused, as is a 16-bit RGB PNG with a colour key (Pillow drops the low byte
  before the key can be matched).
* Transparency (alpha channel, palette or colour-key transparency) is composited on white,
  as img2dataset (LAION, DataComp) does and as such images usually appear on a page; an
  opaque image keeps its pixels.
* CMYK and other modes use Pillow's conversion; embedded ICC profiles are ignored, as by
  timm's and torchvision's loaders.

A file larger than ``max_pixels`` (width x height, read from its header before any pixel
is decoded) is refused, unless it is a JPEG that DCT scaling (1/2, 1/4, 1/8 while decoding)
brings within the limit with its shorter side still at least the eval resize. Pillow's own
decompression-bomb check (``PIL.Image.MAX_IMAGE_PIXELS``) would refuse a big JPEG before its
header could be read, warn below our limit and contradict a limit above its own, so it is
switched off while one of our decodes runs and restored as soon as none does (other code
in the process keeps it; a concurrent ``Image.open`` in another thread during that window
goes unchecked). Modes that need numpy are converted by strips of rows, so that decoding
holds the file's pixels and one 8-bit RGB copy, no more.
"""
from __future__ import annotations

import io
import math
import threading
from typing import Any, Callable, Sequence, cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, JpegImagePlugin, UnidentifiedImageError

from fungi_ops.adapters import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ModalityAdapter,
    ViewGroup,
    describe_bytes,
    error_text,
    host_buffer,
    payload_bytes,
    to_device,
)
from fungi_ops.backbones import ImageInput
from fungi_ops.errors import ConfigError, SampleError
from fungi_ops.objectives import DINOConfig, ObjectiveConfig, SimCLRConfig
from fungi_ops.seeding import generator

MAX_ASPECT = 4.0
CROP_TRIES = 10
WHITE = 255  # what transparent pixels are composited on
HIGH_BIT_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # read as 16-bit grey
JPEG_REDUCTIONS = (2, 4, 8)  # the DCT scalings libjpeg decodes at
PNG_BIT_DEPTH_OFFSET = 24  # signature (8) + IHDR length, type, width, height (4 each)
STRIP_PIXELS = 1 << 20  # pixels converted at a time when a mode needs numpy


class ImageAdapter(ModalityAdapter):
    """Images: eval centre crop, DINO multi-crop and SimCLR patch views, cut on the model's device.

    ``settings`` gives the model's input side, eval resize and normalisation mean/std;
    ``max_pixels`` bounds an encoded image's width x height (see the module docstring).
    """

    modality = "image"
    view_kinds = ("eval", "multicrop", "contrastive")

    def __init__(self, settings: ImageInput, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
            raise ConfigError(f"max image pixels must be a positive integer, got {max_pixels!r}")
        self.settings = settings
        self.max_pixels = max_pixels
        mean = torch.tensor(settings.mean).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(settings.std).view(1, 3, 1, 1) * 255.0
        self._mean, self._std = mean, std

    # -- decode ---------------------------------------------------------------
    def decode(self, payload: Any) -> np.ndarray:
        """Encoded image bytes (or a uint8 array) -> uint8 ``[H, W, 3]`` at the eval resize."""
        image = self.open_rgb(payload)
        width, height = image.size
        short = self.settings.resize_size
        scale = short / min(width, height)
        new_w, new_h = max(short, round(width * scale)), max(short, round(height * scale))
        new_w, new_h = min(new_w, self.max_long_side), min(new_h, self.max_long_side)
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), Image.BICUBIC, reducing_gap=None)
        return np.asarray(image, dtype=np.uint8)

    def open_rgb(self, payload: Any) -> Image.Image:
        """Encoded image bytes (or a uint8 array) -> a loaded 8-bit RGB PIL image; SampleError for a bad row."""
        with _PILLOW_BOMB_CHECK_OFF:
            if isinstance(payload, np.ndarray):
                image = rgb_image(array_image(payload))
            else:
                data = payload_bytes(payload, "image", "bytes (an encoded image) or a uint8 array")
                image = rgb_image(self._open(data))
        width, height = image.size
        if width < 1 or height < 1:
            raise SampleError(f"image has no pixels ({width}x{height})")
        return image

    def _open(self, data: bytes) -> Image.Image:
        """The decoded (loaded) image in ``data``, reduced or refused first if above ``max_pixels``."""
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as exc:
            reason = "not a recognised image format, or a corrupt header"
            raise SampleError(f"cannot decode image: {reason} ({describe_bytes(data)})") from exc
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes
            raise SampleError(f"cannot decode image ({describe_bytes(data)}): {error_text(exc)}") from exc
        self.fit_pixel_limit(image)
        sixteen_bit_png = image.format == "PNG" and data[PNG_BIT_DEPTH_OFFSET] == 16
        if sixteen_bit_png and image.mode == "RGB" and "transparency" in image.info:
            raise SampleError(
                "16-bit RGB PNG with a colour key (tRNS): Pillow decodes it to 8 bits before the key can be "
                "matched, so its transparency cannot be applied faithfully"
            )
        try:
            image.load()
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt data
            detail = f"{image.format}, {describe_bytes(data)}"
            raise SampleError(f"cannot decode image ({detail}): {error_text(exc)}") from exc
        return image

    def fit_pixel_limit(self, image: Image.Image) -> None:
        """Before decoding: reduce a JPEG above ``max_pixels`` with DCT scaling, or raise SampleError.

        The reduction is the mildest that fits the limit and keeps the shorter side at
        least the eval resize; an image within the limit is left alone.
        """
        width, height = image.size
        if width * height <= self.max_pixels:
            return
        short_side = self.settings.resize_size
        if isinstance(image, JpegImagePlugin.JpegImageFile):  # MPO (camera JPEGs) included
            for factor in JPEG_REDUCTIONS:
                reduced = (-(-width // factor), -(-height // factor))  # libjpeg rounds up
                if min(reduced) < short_side:
                    break
                if reduced[0] * reduced[1] <= self.max_pixels:
                    image.draft(None, (width // factor, height // factor))
                    if image.size == reduced:
                        return
                    break
            reason = (
                f"JPEG reduction while decoding (1/2, 1/4, 1/8) cannot bring it within the limit "
                f"with its shorter side still at least {short_side} px"
            )
        else:
            reason = f"only JPEGs can be reduced while decoding; downscale this {image.format} image beforehand"
        size = f"{width}x{height} ({width * height / 1e6:.1f} Mpx)"
        raise SampleError(f"image is {size}, above --max-image-pixels {self.max_pixels}; {reason}")

    # -- views ----------------------------------------------------------------
    @property
    def max_long_side(self) -> int:
        """Cap, in pixels, on a decoded image's longer side: ``MAX_ASPECT`` x the eval resize."""
        return int(self.settings.resize_size * MAX_ASPECT)

    def _patch_geometry(self, config: SimCLRConfig) -> tuple[int, int, int]:
        size = self.settings.input_size
        patch = size / math.sqrt(config.num_patches)
        if not patch.is_integer():
            raise ConfigError(
                f"simclr: input size {size} is not divisible by sqrt(num_patches={config.num_patches})"
            )
        stride = int(patch / config.stride_scale)
        if stride < 1:
            raise ConfigError(f"simclr: stride_scale {config.stride_scale} leaves a zero stride")
        per_side = (size - int(patch)) // stride + 1
        return int(patch), stride, per_side

    def views_per_sample(self, kind: str, config: ObjectiveConfig | None) -> int:
        """Views of ``kind`` per sample: 1 eval view, 2 + ``local_crops_number`` DINO crops, or the SimCLR patch grid.

        Raises ConfigError for a kind/config pair images do not support (or a patch
        geometry that does not fit the input size).
        """
        if kind == "eval":
            return 1
        if kind == "multicrop" and isinstance(config, DINOConfig):
            return 2 + config.local_crops_number
        if kind == "contrastive" and isinstance(config, SimCLRConfig):
            return self._patch_geometry(config)[2] ** 2
        raise ConfigError(f"images have no '{kind}' views for {type(config).__name__}")

    def view_boxes(
        self, shapes: torch.Tensor, keys: Sequence[str], groups: Sequence[ViewGroup], seed: int
    ) -> torch.Tensor:
        """``[B, views, 4]`` boxes (x0, y0, w, h), in each image's own pixels, of all views in group order.

        ``shapes`` holds each image's (height, width) as float64. Only the random draws are
        per sample (each from its own stream); the geometry is computed for the whole batch.
        """
        size = self.settings.input_size
        heights, widths = shapes[:, 0], shapes[:, 1]
        batch = shapes.shape[0]
        per_group = []
        for group in groups:
            if group.kind == "eval":
                side_h, side_w = heights.clamp(max=size), widths.clamp(max=size)
                top, left = torch.round((heights - side_h) / 2.0), torch.round((widths - side_w) / 2.0)
                per_group.append(torch.stack([left, top, side_w, side_h], dim=1)[:, None])
            elif group.kind == "multicrop":
                config: DINOConfig = group.config  # type: ignore[assignment]
                scales = [config.global_crops_scale] * 2 + [config.local_crops_scale] * config.local_crops_number
                uniform = torch.stack(
                    [
                        torch.rand((len(scales), CROP_TRIES, 4), generator=generator(seed, "views", "multicrop", key), dtype=torch.float64)
                        for key in keys
                    ]
                )
                per_group.append(random_resized_boxes(heights, widths, scales, uniform))
            else:
                config_s: SimCLRConfig = group.config  # type: ignore[assignment]
                patch, stride, per_side = self._patch_geometry(config_s)
                offsets = torch.arange(per_side, dtype=torch.float64) * stride
                top, left = torch.meshgrid(offsets, offsets, indexing="ij")
                scale_x, scale_y = (widths / size)[:, None], (heights / size)[:, None]
                per_group.append(
                    torch.stack(
                        [
                            left.flatten() * scale_x,
                            top.flatten() * scale_y,
                            (patch * scale_x).expand(batch, per_side**2),
                            (patch * scale_y).expand(batch, per_side**2),
                        ],
                        dim=2,
                    )
                )
        return torch.cat(per_group, dim=1)

    def build_views(
        self,
        samples: Sequence[np.ndarray],
        keys: Sequence[str],
        groups: Sequence[ViewGroup],
        seed: int,
        device: torch.device,
    ) -> torch.Tensor:
        """Normalised ``[views_total, 3, S, S]`` float tensor, group-major then sample-major."""
        size = self.settings.input_size
        short, long = self.settings.resize_size, self.max_long_side
        # Landscape canvas of a fixed size: portrait images are stored transposed, so a
        # sample's sampling grid (hence its views) never depends on the batch around it.
        host = host_buffer((len(samples), short, long, 3), torch.uint8, device)  # pinned for CUDA
        canvas = host.numpy()
        transposed = []
        for index, sample in enumerate(samples):
            transposed.append(int(sample.shape[0]) > int(sample.shape[1]))
            pixels = sample.transpose(1, 0, 2) if transposed[-1] else sample
            canvas[index, : pixels.shape[0], : pixels.shape[1]] = pixels
        # Normalising before resampling is exact up to rounding (bilinear weights sum to
        # one) and touches ~12x fewer values than normalising the views.
        images = to_device(host, device).permute(0, 3, 1, 2).float()
        images = ((images - self._mean.to(device)) / self._std.to(device)).contiguous()

        shapes = torch.tensor([s.shape[:2] for s in samples], dtype=torch.float64)
        boxes = self.view_boxes(shapes, keys, groups, seed).to(device=device, dtype=torch.float32)  # [B, V, 4]
        shapes = shapes.to(device, torch.float32)
        batch, total_views = boxes.shape[:2]
        views = torch.empty((batch * total_views, 3, size, size), dtype=torch.float32, device=device)
        # On the CPU one sample at a time keeps every intermediate small (one grid_sample
        # for the batch allocated ~100 MB per image afresh, whose page faults cost as much
        # as the sampling); accelerators take the whole batch in one call per group.
        block = 1 if device.type == "cpu" else batch
        start = 0
        for group in groups:
            for first in range(0, batch, block):
                rows = slice(first, min(batch, first + block))
                grid = box_grid(boxes[rows, start : start + group.count], shapes[rows], transposed[rows], size, short, long)
                sampled = F.grid_sample(images[rows], grid, mode="bilinear", padding_mode="border", align_corners=False)
                # straight into the group-major, sample-major layout the model consumes
                target = views[(start * batch + first * group.count) : (start * batch + rows.stop * group.count)]
                target.view(-1, group.count, 3, size, size).copy_(sampled.view(-1, 3, group.count, size, size).transpose(1, 2))
            start += group.count
        return views


class _PillowBombCheckOff:
    """Context: ``PIL.Image.MAX_IMAGE_PIXELS`` is None while any decode is inside it.

    The caller's value comes back when the last one leaves; counted under a lock, so that
    overlapping decodes in threads cannot restore None.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0
        self._saved: int | None = None

    def __enter__(self) -> None:
        with self._lock:
            if self._inside == 0:
                self._saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            self._inside += 1

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._inside -= 1
            if self._inside == 0:
                Image.MAX_IMAGE_PIXELS = self._saved


_PILLOW_BOMB_CHECK_OFF = _PillowBombCheckOff()


def array_image(array: np.ndarray) -> Image.Image:
    """A uint8 ``[H, W]``, ``[H, W, 3]`` or ``[H, W, 4]`` (RGBA) array as a PIL image, else SampleError."""
    if array.dtype != np.uint8 or array.ndim < 2 or array.shape[2:] not in ((), (3,), (4,)):
        shape = f"{array.dtype} {list(array.shape)}"
        raise SampleError(f"image array must be uint8 [H, W], [H, W, 3] or [H, W, 4], got {shape}")
    return Image.fromarray(array)


def rgb_image(image: Image.Image) -> Image.Image:
    """A decoded image as 8-bit RGB by the rules of the module docstring; SampleError if not faithful."""
    mode = image.mode
    if mode == "F":
        raise SampleError(
            "image has floating-point samples (mode F), whose value range is not defined; "
            "store it with 8- or 16-bit integer samples"
        )
    if mode in HIGH_BIT_GREY_MODES:
        low, high = cast("tuple[int, int]", image.getextrema())  # one band
        if low < 0 or high > 0xFFFF:  # only mode I can hold such values
            raise SampleError(
                f"image has 32-bit integer samples from {low} to {high}, outside the 16-bit range "
                "0..65535, so they cannot be scaled to 8 bits faithfully"
            )
        return by_strips(image, high_byte_grey)
    try:
        if image.has_transparency_data:
            return by_strips(image, over_white)
        return image if mode == "RGB" else image.convert("RGB")
    except ValueError as exc:  # a mode Pillow cannot convert
        raise SampleError(f"cannot convert image mode {mode} to RGB: {error_text(exc)}") from exc


def by_strips(image: Image.Image, convert: Callable[[Image.Image], np.ndarray]) -> Image.Image:
    """The RGB image whose strips of rows are ``convert(strip)`` (uint8 ``[h, W, 3]``).

    Strips of ~``STRIP_PIXELS`` pixels: besides the result, no full-size intermediate is made.
    """
    width, height = image.size
    out = Image.new("RGB", image.size)
    rows = max(1, STRIP_PIXELS // max(1, width))
    for top in range(0, height, rows):
        strip = image.crop((0, top, width, min(height, top + rows)))
        out.paste(Image.fromarray(convert(strip)), (0, top))
    return out


def high_byte_grey(strip: Image.Image) -> np.ndarray:
    """A 16-bit grey strip as RGB of its high bytes; pixels equal to a colour key become white."""
    values = np.asarray(strip)
    grey = (values >> 8).astype(np.uint8)
    key = strip.info.get("transparency")
    if isinstance(key, int):  # a colour key, in the same 16-bit units
        grey[values == key] = WHITE
    return np.repeat(grey[..., None], 3, axis=2)


def over_white(strip: Image.Image) -> np.ndarray:
    """A strip with transparency composited on white: ``round((c * a + 255 * (255 - a)) / 255)`` per channel."""
    rgba = np.asarray(strip.convert("RGBA"), dtype=np.uint16)
    color, alpha = rgba[..., :3], rgba[..., 3:]
    return ((color * alpha + WHITE * (255 - alpha) + 127) // 255).astype(np.uint8)


def box_grid(
    boxes: torch.Tensor, shapes: torch.Tensor, transposed: Sequence[bool], size: int, canvas_h: int, canvas_w: int
) -> torch.Tensor:
    """``grid_sample`` grid ``[B, V*S, S, 2]`` resampling each box to ``size x size``.

    ``boxes`` are ``[B, V, 4]`` (x0, y0, w, h) in each image's own pixels, ``shapes`` its
    (h, w); ``transposed`` marks images stored transposed on the canvas. Output pixel
    centres map into the box; coordinates are clamped to the image's own extent so that
    canvas padding is never sampled. The grid is separable (x varies along output columns,
    y along rows), so coordinates are computed per row/column and only broadcast into it.
    """
    steps = (torch.arange(size, device=boxes.device, dtype=torch.float32) + 0.5) / size  # [S]
    x0, y0, bw, bh = boxes.unbind(-1)  # [B, V]
    heights, widths = shapes[:, 0].view(-1, 1, 1), shapes[:, 1].view(-1, 1, 1)
    xs = torch.minimum((x0[..., None] + steps * bw[..., None] - 0.5).clamp(min=0.0), widths - 1)  # [B, V, S]
    ys = torch.minimum((y0[..., None] + steps * bh[..., None] - 0.5).clamp(min=0.0), heights - 1)
    batch, views = boxes.shape[:2]
    grid = torch.empty((batch, views, size, size, 2), dtype=torch.float32, device=boxes.device)
    for index, flip in enumerate(transposed):
        # canvas x runs along the image's rows when the image is stored transposed
        canvas_x, canvas_y = (ys[index], xs[index]) if flip else (xs[index], ys[index])
        grid_x, grid_y = (2.0 * canvas_x + 1.0) / canvas_w - 1.0, (2.0 * canvas_y + 1.0) / canvas_h - 1.0
        grid[index, ..., 0] = grid_x[:, :, None] if flip else grid_x[:, None, :]
        grid[index, ..., 1] = grid_y[:, None, :] if flip else grid_y[:, :, None]
    return grid.view(batch, views * size, size, 2)


def random_resized_boxes(
    heights: torch.Tensor, widths: torch.Tensor, scales: Sequence[tuple[float, float]], uniform: torch.Tensor
) -> torch.Tensor:
    """torchvision's RandomResizedCrop box sampling (ratio 3/4-4/3, 10 tries, centre fallback).

    ``heights``/``widths``: ``[B]`` image sizes; ``uniform``: ``[B, len(scales), tries, 4]``
    draws in [0, 1) (area, log-ratio, top, left). Returns ``[B, len(scales), 4]`` boxes.
    """
    height, width = heights.view(-1, 1, 1), widths.view(-1, 1, 1)
    low = torch.tensor([s[0] for s in scales], dtype=torch.float64)[:, None]
    high = torch.tensor([s[1] for s in scales], dtype=torch.float64)[:, None]
    target_area = height * width * (low + (high - low) * uniform[..., 0])
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * uniform[..., 1]
    ratio = torch.exp(log_ratio)
    crop_w = torch.round(torch.sqrt(target_area * ratio))
    crop_h = torch.round(torch.sqrt(target_area / ratio))
    valid = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    top = torch.floor(uniform[..., 2] * (height - crop_h + 1))
    left = torch.floor(uniform[..., 3] * (width - crop_w + 1))
    first = torch.argmax(valid.to(torch.int8), dim=2, keepdim=True)  # first try that fits
    chosen = torch.stack([left, top, crop_w, crop_h], dim=-1).gather(2, first[..., None].expand(-1, -1, 1, 4))[:, :, 0]
    # centre-crop fallback when no try fitted (torchvision's behaviour)
    in_ratio = widths / heights
    fb_w = torch.where(in_ratio > 4 / 3, torch.round(heights * (4 / 3)), widths)
    fb_h = torch.where(in_ratio < 3 / 4, torch.round(widths / (3 / 4)), heights)
    fallback = torch.stack(
        [torch.div(widths - fb_w, 2, rounding_mode="floor"), torch.div(heights - fb_h, 2, rounding_mode="floor"), fb_w, fb_h],
        dim=1,
    )
    return torch.where(valid.any(dim=2, keepdim=True), chosen, fallback[:, None])
