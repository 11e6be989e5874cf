"""Decoding raw payloads: image modes and bit depths, the pixel limit, error messages, payload types.

Images are 73 px on their shorter side, the eval resize of a 64 px model, so that decode
returns their pixels unresized and the expected 8-bit values can be compared exactly.
"""
from __future__ import annotations

import io
import re
import struct
import warnings
import zlib

import numpy as np
import pyarrow as pa
import pytest
from conftest import png_bytes, wav_bytes
from PIL import Image

from fungi_ops.adapters import DEFAULT_MAX_IMAGE_PIXELS, make_decoder
from pipelines.inputs import payload_type_error
import fungi_ops.adapters.image as image_module
from fungi_ops.adapters.image import ImageAdapter
from fungi_ops.backbones import AudioInput, ImageInput, TextInput
from fungi_ops.errors import ConfigError, SampleError

SETTINGS = ImageInput(input_size=64)  # eval resize 73
SHORT = SETTINGS.resize_size
SIXTEEN_BIT = np.array([0, 1, 255, 256, 257, 1000, 32767, 32768, 40000, 65279, 65280, 65534, 65535], dtype=np.uint16)
ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")


@pytest.fixture(scope="module")
def adapter() -> ImageAdapter:
    return ImageAdapter(SETTINGS)


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png16(samples: np.ndarray, color_type: int, trns: tuple[int, ...] | None = None) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour): grey 0, RGB 2, grey+alpha 4, RGBA 6."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = samples.shape[:2]
    rows = samples.astype(">u2").reshape(height, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0))
    key = chunk(b"tRNS", struct.pack(f">{len(trns)}H", *trns)) if trns else b""
    return b"\x89PNG\r\n\x1a\n" + header + key + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def tile(values: np.ndarray, width: int = 80) -> np.ndarray:
    """``values`` repeated along rows into a [SHORT, width, ...] image."""
    reps = -(-SHORT * width // values.shape[0])
    return np.resize(np.tile(values, (reps,) + (1,) * (values.ndim - 1)), (SHORT, width) + values.shape[1:])


def high_byte(values: np.ndarray) -> np.ndarray:
    return (values.astype(np.uint32) >> 8).astype(np.uint8)


def on_white(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    color, alpha = color.astype(np.float64), alpha.astype(np.float64)[..., None]
    return np.floor(color * alpha / 255 + 255 * (1 - alpha / 255) + 0.5).astype(np.uint8)


def grey_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


# -- bit depth ------------------------------------------------------------------------
def test_16_bit_grey_png_keeps_the_high_byte(adapter: ImageAdapter) -> None:
    """Was ``convert("RGB")``: every value >= 255 became white."""
    values = tile(SIXTEEN_BIT)
    payload = encode(Image.fromarray(values))
    assert Image.open(io.BytesIO(payload)).mode == "I;16"
    np.testing.assert_array_equal(adapter.decode(payload), grey_rgb(high_byte(values)))


def test_16_bit_rgb_and_grey_pngs_of_one_picture_decode_alike(adapter: ImageAdapter) -> None:
    """Pillow keeps the high byte of 16-bit RGB itself; grey follows the same rule."""
    values = tile(SIXTEEN_BIT)
    rgb = np.stack([values, values[:, ::-1], np.full_like(values, 40000)], axis=2)
    np.testing.assert_array_equal(adapter.decode(png16(rgb, 2)), high_byte(rgb))
    grey_as_rgb = png16(np.repeat(values[..., None], 3, axis=2), 2)
    np.testing.assert_array_equal(adapter.decode(grey_as_rgb), adapter.decode(png16(values, 0)))
    # within one level of v / 257, exact for 8-bit data stored in 16 bits
    assert np.abs(high_byte(SIXTEEN_BIT).astype(int) - np.round(SIXTEEN_BIT / 257)).max() <= 1
    eight = np.arange(256, dtype=np.uint16)
    np.testing.assert_array_equal(high_byte(eight * 257), eight)


def test_32_bit_integer_images_within_16_bits_are_scaled_others_refused(adapter: ImageAdapter) -> None:
    """Mode I: a 16-bit PGM opens as I with values up to 65535; a signed 32-bit TIFF may hold anything."""
    values = tile(SIXTEEN_BIT)
    pgm = b"P5\n80 73\n65535\n" + values.astype(">u2").tobytes()
    assert Image.open(io.BytesIO(pgm)).mode == "I"
    np.testing.assert_array_equal(adapter.decode(pgm), grey_rgb(high_byte(values)))
    wide = tile(np.array([0, 70000, -5], dtype=np.int32))
    with pytest.raises(SampleError, match=r"32-bit integer samples from -5 to 70000, outside the 16-bit range"):
        adapter.decode(encode(Image.fromarray(wide), "TIFF"))


def test_float_images_are_refused(adapter: ImageAdapter) -> None:
    payload = encode(Image.fromarray(tile(np.array([0.0, 0.5, 1.0], dtype=np.float32))), "TIFF")
    with pytest.raises(SampleError, match=r"floating-point samples \(mode F\)"):
        adapter.decode(payload)


# -- transparency and colour ------------------------------------------------------------------
def test_alpha_is_composited_on_white(adapter: ImageAdapter) -> None:
    rng = np.random.default_rng(0)
    rgba = tile(rng.integers(0, 256, (97, 4), dtype=np.uint8))
    rgba[0, :4, 3] = [0, 255, 128, 1]
    np.testing.assert_array_equal(adapter.decode(encode(Image.fromarray(rgba))), on_white(rgba[..., :3], rgba[..., 3]))
    la = rgba[..., [0, 3]]
    expected_la = grey_rgb(on_white(la[..., :1], la[..., 1])[..., 0])
    np.testing.assert_array_equal(adapter.decode(encode(Image.fromarray(la, "LA"))), expected_la)
    opaque = rgba.copy()
    opaque[..., 3] = 255
    np.testing.assert_array_equal(adapter.decode(encode(Image.fromarray(opaque))), rgba[..., :3])
    np.testing.assert_array_equal(adapter.decode(rgba), on_white(rgba[..., :3], rgba[..., 3]))  # arrays too


def test_16_bit_alpha_and_colour_keys(adapter: ImageAdapter) -> None:
    values = tile(SIXTEEN_BIT)
    rgba = np.stack([values, values, values[:, ::-1], values[::-1]], axis=2)
    expected = on_white(high_byte(rgba[..., :3]), high_byte(rgba[..., 3]))
    np.testing.assert_array_equal(adapter.decode(png16(rgba, 6)), expected)
    keyed = grey_rgb(np.where(values == 1000, 255, high_byte(values)).astype(np.uint8))
    np.testing.assert_array_equal(adapter.decode(png16(values, 0, trns=(1000,))), keyed)
    with pytest.raises(SampleError, match="16-bit RGB PNG with a colour key"):
        adapter.decode(png16(np.repeat(values[..., None], 3, 2), 2, trns=(1000, 1000, 1000)))


def test_conversions_by_strips_match_whole_images(adapter: ImageAdapter, monkeypatch) -> None:
    """Strips of 3 rows (the default is ~1 Mpx): same pixels, colour keys and palettes carried along."""
    values = tile(SIXTEEN_BIT)
    rgba = np.random.default_rng(5).integers(0, 256, (SHORT, 80, 4), dtype=np.uint8)
    image = Image.fromarray(tile(np.arange(4, dtype=np.uint8)), "P")
    image.putpalette([10, 20, 30, 200, 100, 0, 0, 0, 0, 5, 250, 5])
    keyed_palette = encode(image, transparency=bytes([9, 0, 255, 64]))
    payloads = [png16(values, 0, trns=(1000,)), encode(Image.fromarray(rgba)), keyed_palette]
    whole = [adapter.decode(payload) for payload in payloads]
    monkeypatch.setattr(image_module, "STRIP_PIXELS", 3 * 80)
    for payload, expected in zip(payloads, whole):
        np.testing.assert_array_equal(adapter.decode(payload), expected)


def test_palette_transparency_is_composited(adapter: ImageAdapter) -> None:
    indices = tile(np.arange(4, dtype=np.uint8))
    image = Image.fromarray(indices, "P")
    image.putpalette([10, 20, 30, 200, 100, 0, 0, 0, 0, 5, 250, 5])
    payload = encode(image, transparency=bytes([255, 255, 0, 64]))
    half_green = on_white(np.array([[5, 250, 5]]), np.array([64]))[0]
    colours = np.array([[10, 20, 30], [200, 100, 0], [255, 255, 255], half_green])
    np.testing.assert_array_equal(adapter.decode(payload), colours[indices])


def test_cmyk_and_grey_use_the_plain_conversions(adapter: ImageAdapter) -> None:
    rng = np.random.default_rng(1)
    cmyk = tile(rng.integers(0, 256, (89, 4), dtype=np.uint8))
    ink = 255 - cmyk.astype(float)
    expected = np.round(ink[..., :3] * ink[..., 3:] / 255).astype(np.uint8)
    np.testing.assert_array_equal(adapter.decode(encode(Image.fromarray(cmyk, "CMYK"), "TIFF")), expected)
    grey = tile(np.arange(256, dtype=np.uint8))
    np.testing.assert_array_equal(adapter.decode(encode(Image.fromarray(grey))), grey_rgb(grey))


# -- pixel limit --------------------------------------------------------------------
def test_images_above_the_pixel_limit_are_refused_from_their_header() -> None:
    small = ImageAdapter(SETTINGS, max_pixels=200 * 200 - 1)
    with pytest.raises(SampleError) as error:
        small.decode(png_bytes(200, 200))
    assert str(error.value) == (
        "image is 200x200 (0.0 Mpx), above --max-image-pixels 39999; "
        "only JPEGs can be reduced while decoding; downscale this PNG image beforehand"
    )
    at_limit = ImageAdapter(SETTINGS, max_pixels=200 * 200)
    unlimited = ImageAdapter(SETTINGS).decode(png_bytes(200, 200))
    np.testing.assert_array_equal(at_limit.decode(png_bytes(200, 200)), unlimited)
    with pytest.raises(SampleError, match=r"image has no pixels \(5x0\)"):
        at_limit.decode(np.zeros((0, 5, 3), dtype=np.uint8))


def test_big_jpegs_are_reduced_while_decoding() -> None:
    rng = np.random.default_rng(2)
    payload = encode(Image.fromarray(rng.integers(0, 256, (400, 600, 3), dtype=np.uint8)), "JPEG")
    # 1/2 gives 300x200 (60,000 px) within 70,000 and a shorter side >= 73
    reduced = ImageAdapter(SETTINGS, max_pixels=70_000).decode(payload)
    image = Image.open(io.BytesIO(payload))
    image.draft(None, (300, 200))
    assert image.size == (300, 200)
    expected = np.asarray(image.convert("RGB").resize((110, 73), Image.BICUBIC, reducing_gap=None))
    np.testing.assert_array_equal(reduced, expected)
    assert not np.array_equal(reduced, ImageAdapter(SETTINGS).decode(payload))  # a full decode differs
    # 1/8 would fit 4,000 px but leave a 50 px shorter side
    with pytest.raises(SampleError, match=r"above --max-image-pixels 4000; JPEG reduction .* at least 73 px"):
        ImageAdapter(SETTINGS, max_pixels=4000).decode(payload)


def test_pillow_bomb_check_yields_to_our_limit(monkeypatch) -> None:
    """Pillow would refuse these at open (10x its limit); ours decides, and its setting comes back."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    rng = np.random.default_rng(3)
    jpeg = encode(Image.fromarray(rng.integers(0, 256, (400, 600, 3), dtype=np.uint8)), "JPEG")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        assert ImageAdapter(SETTINGS).decode(png_bytes(150, 150)).shape == (SHORT, SHORT, 3)
        assert ImageAdapter(SETTINGS, max_pixels=70_000).decode(jpeg).shape == (SHORT, 110, 3)
        with pytest.raises(SampleError, match="above --max-image-pixels 100"):
            ImageAdapter(SETTINGS, max_pixels=100).decode(png_bytes(150, 150))
    assert Image.MAX_IMAGE_PIXELS == 2000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(png_bytes(150, 150)))


def test_pixel_limit_setting() -> None:
    assert DEFAULT_MAX_IMAGE_PIXELS == 100_000_000
    assert make_decoder("image", SETTINGS).max_pixels == DEFAULT_MAX_IMAGE_PIXELS
    assert make_decoder("image", SETTINGS, max_image_pixels=5000).max_pixels == 5000
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="max image pixels must be a positive integer"):
            ImageAdapter(SETTINGS, max_pixels=bad)
    with pytest.raises(ConfigError, match="modality must be"):
        make_decoder("video", SETTINGS)


# -- messages and wrong payloads ------------------------------------------------------------
def test_decode_errors_are_clean(adapter: ImageAdapter) -> None:
    audio = make_decoder("audio", AudioInput())
    cases = [
        (
            adapter,
            b"definitely not an image",
            "cannot decode image: not a recognised image format, or a corrupt header "
            "(23 bytes, starting 646566696e697465)",
        ),
        (
            adapter,
            png_bytes(64, 64)[:200],
            "cannot decode image (PNG, 200 bytes, starting 89504e470d0a1a0a): image file is truncated",
        ),
        (audio, b"RIFF garbage", "cannot decode audio (12 bytes, starting 5249464620676172): Format not recognised."),
        (audio, wav_bytes(0.5)[:30], "cannot decode audio (30 bytes, starting 52494646"),
    ]
    for decoder, payload, start in cases:
        with pytest.raises(SampleError) as error:
            decoder.decode(payload)
        message = str(error.value)
        assert message.startswith(start), message
        assert not ADDRESS.search(message) and "object at" not in message, message


@pytest.mark.parametrize("payload", [0, 1.5, 10**30, -3, [1, 2], {"a": 1}, None, True, "x.png"])
def test_wrong_python_types_are_sample_errors(payload) -> None:
    expected = {
        "image": r"image payload must be bytes \(an encoded image\) or a uint8 array, got ",
        "audio": r"audio payload must be bytes \(an encoded audio file\), got ",
        "text": r"text payload must be a string, got ",
    }
    for modality, message in expected.items():
        if modality == "text" and isinstance(payload, str):
            continue
        decoder = make_decoder(modality, {"image": SETTINGS, "audio": AudioInput(), "text": TextInput()}[modality])
        with pytest.raises(SampleError, match=message + type(payload).__name__):
            decoder.decode(payload)


def test_image_arrays_must_be_uint8_images(adapter: ImageAdapter) -> None:
    rgb = np.random.default_rng(4).integers(0, 256, (SHORT, 80, 3), dtype=np.uint8)
    np.testing.assert_array_equal(adapter.decode(rgb), rgb)
    np.testing.assert_array_equal(adapter.decode(rgb[..., 0]), grey_rgb(rgb[..., 0]))
    for bad in (rgb.astype(np.float32) / 255, rgb.astype(np.int64), rgb[..., :2], rgb[None]):
        with pytest.raises(SampleError, match=r"image array must be uint8 \[H, W\], \[H, W, 3\] or \[H, W, 4\], got "):
            adapter.decode(bad)
    with pytest.raises(SampleError, match="empty"):
        adapter.decode(memoryview(b""))


# -- payload column types ----------------------------------------------------------------
ACCEPTED = {
    "text": [
        pa.string(), pa.large_string(), pa.string_view(), pa.binary(), pa.large_binary(), pa.binary_view(),
        pa.dictionary(pa.int32(), pa.string()),
    ],
    "image": [pa.binary(), pa.large_binary(), pa.binary_view(), pa.binary(16), pa.dictionary(pa.int8(), pa.binary())],
}
ACCEPTED["audio"] = ACCEPTED["image"]
HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # a Hugging Face Image/Audio feature
REFUSED = [pa.int64(), pa.float32(), pa.list_(pa.binary()), HF_IMAGE, pa.null(), pa.bool_()]


@pytest.mark.parametrize("modality", ["text", "image", "audio"])
def test_payload_column_types(modality: str) -> None:
    for arrow_type in ACCEPTED[modality]:
        assert payload_type_error(modality, arrow_type, "data") is None, arrow_type
    refused = REFUSED + ([pa.binary(16)] if modality == "text" else [pa.string(), pa.large_string()])
    for arrow_type in refused:
        message = payload_type_error(modality, arrow_type, "payload")
        start = f"column 'payload' has type {arrow_type}, which cannot hold {modality} payloads; expected "
        assert message is not None and message.startswith(start), message
    assert "'bytes' field" in payload_type_error(modality, HF_IMAGE, "img")
    assert "expected a binary column of encoded image files" in payload_type_error("image", pa.int64(), "img")
    with pytest.raises(ConfigError):
        payload_type_error("video", pa.binary(), "data")
