"""Decoding and resizing images, once, in a way training, evaluation and serving share.

Decoding full-size PNGs dominates CPU time, so every image is decoded and resized once into a
small uint8 array; epochs augment from those arrays. The arrays for a dataset are kept in one
contiguous block (shared copy-on-write with DataLoader workers) and optionally on disk, keyed by
the decode code's version, file path, size, modification time and target size.

Decoding applies the EXIF orientation (a phone photo stored sideways is scored upright) and
scales 16-bit greyscale to 8 bit (PIL's own RGB conversion clips it to white).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from skinml.data.image_config import DEFAULT_MAX_PIXELS  # noqa: F401  (defined once, re-exported)

log = logging.getLogger(__name__)
CACHE_DIR_ENV = "SKINML_CACHE_DIR"
#: Serving refuses photos whose short side is below this (PAD-UFES-20's smallest: 167 px).
DEFAULT_MIN_SIDE = 32
#: Part of the decode cache key: bump it whenever decoding changes what pixels come out, so
#: arrays cached by older code are never reused. 2: EXIF orientation, 16-bit greyscale scaling.
DECODE_VERSION = 2

# 16-bit greyscale as PIL opens it (PNG gives "I;16", TIFF may give the others; "I" is 32-bit
# storage of the same 0-65535 values).
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageError(ValueError):
    """An image cannot be used; the message names the file (or request row)."""


def _check_size(width: int, height: int, label: str, max_pixels: int, min_side: int) -> None:
    if width * height > max_pixels:
        raise ImageError(
            f"image '{label}' is {width}x{height} = {width * height:,} pixels, above the limit of {max_pixels:,}"
        )
    if min(width, height) < min_side:
        raise ImageError(
            f"image '{label}' is {width}x{height} pixels, below the minimum of {min_side} px on the short side"
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        # convert("RGB") clips 16-bit values at 255 (a white picture); keep the high byte instead.
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
        return Image.fromarray(values.astype(np.uint8), mode="L").convert("RGB")
    # RGBA and palette PNGs occur in PAD-UFES-20; the models see RGB. 16-bit RGB(A) PNGs
    # arrive here already as 8-bit RGB(A): PIL keeps the high byte of each sample.
    return image.convert("RGB")


def open_image(source: str | os.PathLike | bytes, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
               min_side: int = 0) -> Image.Image:
    """Decode a file path or raw bytes into an upright RGB image, with errors naming ``name``.

    The pixel limit and ``min_side`` are checked from the header before any pixel is decoded.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "image bytes")
    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    except OSError as exc:
        raise ImageError(f"cannot open image '{label}': {exc.strerror or exc}") from exc
    try:
        with handle, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(handle)
            _check_size(*image.size, label, max_pixels, min_side)
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of an upright photo
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot decode image '{label}': not a readable PNG/JPEG ({exc})") from exc
    return _to_rgb(image)


def check_image(source: str | os.PathLike | bytes, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                min_side: int = 0) -> tuple[int, int]:
    """Check the size limits from the header alone (no pixel is decoded); returns (width, height)."""
    label = name or (str(source) if not isinstance(source, bytes) else "image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
                size = image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot decode image '{label}': not a readable PNG/JPEG ({exc})") from exc
    _check_size(*size, label, max_pixels, min_side)
    return size


def resize_to_array(image: Image.Image, size: int) -> np.ndarray:
    """Square bilinear (antialiased) resize to ``size`` x ``size``; returns uint8 HWC."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8).copy()


def load_resized(path: str | os.PathLike, size: int) -> np.ndarray:
    return resize_to_array(open_image(path), size)


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "skinml" / "images")


def _cache_key(paths: Sequence[str], size: int) -> str:
    digest = hashlib.sha256(f"v{DECODE_VERSION}|{size}".encode())
    for p in paths:
        stat = os.stat(p)
        digest.update(f"|{os.path.abspath(p)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


def decode_all(paths: Sequence[str], size: int, cache_dir: str | os.PathLike | None = None, workers: int | None = None) -> np.ndarray:
    """Decode and resize every path once into an (N, size, size, 3) uint8 array.

    With ``cache_dir`` the array is stored as ``.npy`` and reused while the files are unchanged.
    Decoding runs in a small thread pool (PIL releases the GIL while decoding).
    """
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"{_cache_key(paths, size)}_{size}.npy"
        if cache_file.is_file():
            try:
                array = np.load(cache_file, mmap_mode=None)
                if array.shape == (len(paths), size, size, 3):
                    log.info("image cache hit: %s", cache_file)
                    return array
            except (OSError, ValueError):
                log.warning("ignoring unreadable image cache %s", cache_file)
    array = np.empty((len(paths), size, size, 3), dtype=np.uint8)

    def work(i: int) -> None:
        array[i] = load_resized(paths[i], size)

    workers = workers or min(4, os.cpu_count() or 1)
    if workers > 1 and len(paths) > 16:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(work, range(len(paths))))
    else:
        for i in range(len(paths)):
            work(i)
    if cache_file is not None:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, array)
            os.replace(tmp, cache_file)  # atomic: a concurrent reader never sees half a file
        except OSError as exc:
            log.warning("could not write image cache %s: %s", cache_file, exc)
    return array
