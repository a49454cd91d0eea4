"""The one decode path training, evaluation and serving share: EXIF orientation, 16-bit
images, degenerate sizes and the decode cache key."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from skinml.data import images
from skinml.data.image_config import ImageConfig
from skinml.data.images import ImageError, check_image, decode_all, open_image
from skinml.data.transforms import prepare_image

ORIENTATION = 0x0112


def upright_photo(width: int = 96, height: int = 64) -> np.ndarray:
    """A landscape picture that no rotation or flip maps onto itself: a red block top-left, a
    blue bar along the bottom, a horizontal gradient."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[..., 1] = np.linspace(0, 200, width, dtype=np.uint8)[None, :]
    pixels[: height // 3, : width // 4] = (230, 30, 30)
    pixels[-height // 6:, :] = (20, 40, 220)
    return pixels


def jpeg(pixels: np.ndarray, orientation: int | None = None) -> bytes:
    exif = Image.Exif()
    if orientation is not None:
        exif[ORIENTATION] = orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=98, exif=exif.tobytes())
    return buffer.getvalue()


def png16(samples: np.ndarray) -> bytes:
    """A 16-bit PNG (greyscale, grey+alpha, RGB or RGBA by the channel count), written by hand:
    PIL writes 16-bit greyscale only."""
    height, width = samples.shape[:2]
    channels = 1 if samples.ndim == 2 else samples.shape[2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def gradient16(width: int = 256, height: int = 40) -> np.ndarray:
    """Every 16-bit level band, most of them above 255 (which PIL's RGB conversion clips)."""
    return (np.arange(width * height, dtype=np.int64).reshape(height, width) * 65535 // (width * height - 1)).astype(
        np.uint16)


# -- EXIF orientation ---------------------------------------------------------------------


def test_exif_orientation_6_is_decoded_upright(tmp_path):
    upright = upright_photo()
    # Orientation 6: the camera stored the picture turned 90 degrees anticlockwise, to be shown
    # turned 90 degrees clockwise.
    stored = np.ascontiguousarray(np.rot90(upright, k=1))
    sideways, straight = jpeg(stored, orientation=6), jpeg(upright, orientation=1)

    decoded = np.asarray(open_image(sideways))
    assert decoded.shape == upright.shape  # 64 rows x 96 columns, not 96 x 64
    reference = np.asarray(open_image(straight)).astype(int)
    assert np.abs(decoded.astype(int) - reference).mean() < 3  # the same picture up to JPEG noise
    assert decoded[5, 5, 0] > 180 and decoded[-3, 48, 2] > 180  # red top-left, blue bottom

    # Serving and evaluation (prepare_image) and training (decode_all) see it upright too.
    config = ImageConfig(image_size=32)
    served = prepare_image(sideways, config)
    assert (served - prepare_image(straight, config)).abs().mean() < 0.05
    paths = [tmp_path / "sideways.jpg", tmp_path / "upright.jpg"]
    paths[0].write_bytes(sideways)
    paths[1].write_bytes(straight)
    arrays = decode_all([str(p) for p in paths], 32)
    assert np.abs(arrays[0].astype(int) - arrays[1].astype(int)).mean() < 3


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 7, 8])
def test_every_exif_orientation_comes_out_upright(orientation):
    upright = upright_photo()
    image = Image.fromarray(upright)
    # What the camera stored for each tag: the inverse of the transform the tag asks for.
    stored = {
        2: image.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        3: image.transpose(Image.Transpose.ROTATE_180),
        4: image.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
        5: image.transpose(Image.Transpose.TRANSPOSE),
        7: image.transpose(Image.Transpose.TRANSVERSE),
        8: image.transpose(Image.Transpose.ROTATE_270),
    }[orientation]
    decoded = np.asarray(open_image(jpeg(np.asarray(stored), orientation))).astype(int)
    reference = np.asarray(open_image(jpeg(upright))).astype(int)
    assert decoded.shape == reference.shape
    assert np.abs(decoded - reference).mean() < 3


# -- 16-bit images ------------------------------------------------------------------------


def test_16_bit_greyscale_png_is_scaled_not_clipped():
    samples = gradient16()
    data = png16(samples)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    rgb = np.asarray(open_image(data))
    assert rgb.dtype == np.uint8 and rgb.shape == (*samples.shape, 3)
    assert np.abs(rgb[..., 0].astype(int) - (samples >> 8)).max() <= 1
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    assert (rgb == 255).mean() < 0.01  # PIL's own conversion makes 99.6% of this picture white


@pytest.mark.parametrize("mode", ["I;16B", "I;16L", "I"])
def test_other_16_bit_greyscale_modes(mode):
    samples = gradient16()
    if mode == "I":
        image = Image.fromarray(samples.astype(np.int32), mode="I")
    else:
        image = Image.frombytes(mode, samples.shape[::-1], samples.astype(">u2" if mode.endswith("B") else "<u2").tobytes())
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF")
    rgb = np.asarray(open_image(buffer.getvalue()))
    assert np.abs(rgb[..., 0].astype(int) - (samples >> 8)).max() <= 1


@pytest.mark.parametrize("channels", [2, 3, 4])
def test_16_bit_colour_pngs_keep_the_high_byte(channels):
    base = gradient16()
    planes = [base, 65535 - base, base // 2, np.full_like(base, 50000)][:channels]
    if channels == 2:  # grey + alpha
        planes = [base, np.full_like(base, 65535)]
    samples = np.stack(planes, axis=-1)
    rgb = np.asarray(open_image(png16(samples))).astype(int)
    expected = samples[..., :3] >> 8 if channels >= 3 else np.repeat((samples[..., :1] >> 8), 3, axis=-1)
    assert np.abs(rgb - expected).max() <= 1


# -- degenerate sizes ---------------------------------------------------------------------


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 150, 120)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("size", [(1, 1), (31, 500), (500, 8)])
def test_images_below_the_minimum_side_are_refused(size, tmp_path):
    path = tmp_path / "tiny.png"
    path.write_bytes(png(*size))
    message = f"image '{path}' is {size[0]}x{size[1]} pixels, below the minimum of 32 px on the short side"
    with pytest.raises(ImageError) as caught:
        open_image(str(path), min_side=32)
    assert str(caught.value) == message
    with pytest.raises(ImageError, match="below the minimum of 32 px"):
        check_image(png(*size), name="row 3", min_side=32)


def test_minimum_side_boundary_and_default():
    assert open_image(png(32, 32), min_side=32).size == (32, 32)
    assert check_image(png(32, 400), min_side=32) == (32, 400)
    assert open_image(png(1, 1)).size == (1, 1)  # off unless asked for (training data is checked elsewhere)
    with pytest.raises(ImageError, match="above the limit of 100"):
        check_image(png(20, 20), max_pixels=100)


# -- decode cache key ---------------------------------------------------------------------


def test_decode_cache_key_changes_with_the_decode_version(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    path.write_bytes(png(40, 40))
    key = images._cache_key([str(path)], 32)
    assert images._cache_key([str(path)], 32) == key
    monkeypatch.setattr(images, "DECODE_VERSION", images.DECODE_VERSION + 1)
    assert images._cache_key([str(path)], 32) != key


def test_cache_written_by_older_decode_code_is_not_reused(tmp_path, monkeypatch):
    path = tmp_path / "sideways.jpg"
    path.write_bytes(jpeg(np.ascontiguousarray(np.rot90(upright_photo(), k=1)), orientation=6))
    monkeypatch.setattr(images, "DECODE_VERSION", 1)
    stale = decode_all([str(path)], 32, cache_dir=tmp_path)
    stale[:] = 0  # what an older decoder might have left: it must not come back
    np.save(next(tmp_path.glob("*.npy")), stale)
    monkeypatch.setattr(images, "DECODE_VERSION", 2)
    fresh = decode_all([str(path)], 32, cache_dir=tmp_path)
    assert fresh.any() and len(list(tmp_path.glob("*.npy"))) == 2


def test_decode_is_deterministic_for_plain_rgb():
    pixels = upright_photo()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    np.testing.assert_array_equal(np.asarray(open_image(buffer.getvalue())), pixels)
    assert isinstance(prepare_image(buffer.getvalue(), ImageConfig(image_size=32)), torch.Tensor)
