"""Heatmaps on the photo the user sent, at its own size.

The evaluation transform squashes the *whole* photo to ``view_size`` x ``view_size`` and keeps
the centre ``input_size`` x ``input_size`` (``crop`` pixels in from the top and left; no crop when
``view_size == input_size``), so a feature-grid cell covers the same fraction of the original
photo's width and height; the map is stretched back to the photo's width x height, which undoes
the squash exactly, and the border the crop cut away gets 0 (the model never saw it). Each grid
value is placed where its cell's receptive field is centred (``offset``, in model-input pixels,
from :func:`skinml.explain.image.receptive_field_offset`) and interpolated bilinearly between.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

DEFAULT_ALPHA = 0.45
DEFAULT_COLORMAP = "jet"


Offset = tuple[float, float]


def _model_pixels(n_out: int, input_size: int, view_size: int | None, crop: int) -> torch.Tensor:
    """Model-input coordinate of each output pixel's centre (outside [0, input_size] = cropped)."""
    pixel = torch.arange(n_out, dtype=torch.float64) + 0.5
    return pixel * (view_size or input_size) / n_out - crop  # undo the squash, then the crop


def _grid_coordinates(n_out: int, n_grid: int, input_size: int | None, offset: float,
                      view_size: int | None = None, crop: int = 0) -> torch.Tensor:
    """Grid coordinate (0 .. n_grid - 1) of each output pixel's centre, normalised to [-1, 1]."""
    if input_size is None:  # no model geometry: plain "cell centred in its block"
        grid = (torch.arange(n_out, dtype=torch.float64) + 0.5) * n_grid / n_out - 0.5
    else:
        grid = (_model_pixels(n_out, input_size, view_size, crop) - offset) * n_grid / input_size - 0.5
    if n_grid == 1:
        return torch.zeros(n_out, dtype=torch.float64)
    return grid / (n_grid - 1) * 2 - 1


def resize_map(heatmap: np.ndarray, size: tuple[int, int], input_size: int | None = None,
               offset: Offset = (0.0, 0.0), view_size: int | None = None, crop: int = 0) -> np.ndarray:
    """Bilinear resize of an (h, w) map to ``size`` = (width, height), as a (height, width)
    array. With ``input_size`` (the model's square input side) grid values sit at their
    receptive-field centres, shifted by ``offset`` = (dx, dy) model-input pixels; with a centre
    crop (``view_size`` > ``input_size``, ``crop`` its offset) photo pixels the model did not see
    get 0."""
    width, height = size
    grid = torch.as_tensor(np.asarray(heatmap, dtype=np.float64))[None, None]
    xs = _grid_coordinates(width, grid.shape[-1], input_size, offset[0], view_size, crop)
    ys = _grid_coordinates(height, grid.shape[-2], input_size, offset[1], view_size, crop)
    sample = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None]  # (1, H, W, 2) as (x, y)
    resized = torch.nn.functional.grid_sample(grid, sample, mode="bilinear", padding_mode="border", align_corners=True)
    out = resized[0, 0].numpy().astype(np.float32)
    if input_size is not None and view_size and view_size > input_size:
        inside_x = _model_pixels(width, input_size, view_size, crop).numpy()
        inside_y = _model_pixels(height, input_size, view_size, crop).numpy()
        seen_x = (inside_x >= 0) & (inside_x <= input_size)
        seen_y = (inside_y >= 0) & (inside_y <= input_size)
        out = np.where(seen_y[:, None] & seen_x[None, :], out, 0.0).astype(np.float32)
    return out


def peak(heatmap: np.ndarray, size: tuple[int, int], input_size: int | None = None,
         offset: Offset = (0.0, 0.0), view_size: int | None = None, crop: int = 0) -> tuple[float, float]:
    """(x, y) in photo pixels of the highest cell's receptive-field centre, for a photo of
    ``size`` = (width, height). Taken on the grid: the resized map holds an edge cell's value
    flat out to the border, so its argmax can sit in a photo corner."""
    grid = np.asarray(heatmap)
    row, col = np.unravel_index(int(np.argmax(grid)), grid.shape)
    width, height = size
    if input_size is None:
        return (col + 0.5) * width / grid.shape[1], (row + 0.5) * height / grid.shape[0]
    view = view_size or input_size
    x = ((col + 0.5) * input_size / grid.shape[1] + offset[0] + crop) * width / view
    y = ((row + 0.5) * input_size / grid.shape[0] + offset[1] + crop) * height / view
    return x, y


def overlay(photo: Image.Image, heatmap: np.ndarray, input_size: int | None = None, offset: Offset = (0.0, 0.0),
            alpha: float = DEFAULT_ALPHA, colormap: str = DEFAULT_COLORMAP, view_size: int | None = None,
            crop: int = 0) -> Image.Image:
    """``photo`` with ``heatmap`` (values in [0, 1]) blended on top; the same size as ``photo``."""
    from matplotlib import colormaps

    photo = photo.convert("RGB")
    full = np.clip(resize_map(heatmap, photo.size, input_size, offset, view_size, crop), 0.0, 1.0)
    colours = colormaps[colormap](full)[..., :3] * 255.0
    blended = (1.0 - alpha) * np.asarray(photo, dtype=np.float64) + alpha * colours
    return Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
