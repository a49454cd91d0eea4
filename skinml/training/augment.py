"""The training augmentation, applied to a whole batch at once on whatever device holds it.

:func:`skinml.data.transforms.build_train_transform` augments one image at a time in DataLoader
workers; on a GPU that starves the model (issue #16). :class:`BatchAugment` draws the same
per-sample random parameters from the same distributions and applies them to a uint8 batch
``(B, 3, resize, resize)`` in a handful of batched tensor operations, returning the normalised
float batch ``(B, 3, image_size, image_size)`` the model takes.

It reproduces torchvision v2's semantics step by step, in the same order: random crop,
horizontal and vertical flips, colour jitter (brightness, contrast, saturation, hue in a random
order per sample, with uint8 rounding between steps), rotation then affine (translate, scale),
each nearest-neighbour with zero fill, Gaussian blur (reflect padding, sigma ~ U(0.1, 2)),
scaling to [0, 1], normalisation, random erasing (value 0). The geometric steps are written as
integer gathers rather than with ``grid_sample`` so that the two nearest-neighbour resamplings
torchvision performs (rotation, then affine, each filling with zeros) are reproduced exactly,
corners included; kornia would resample once with different fill and rounding, and draws its
parameters from the global RNG instead of a caller's generator.

Every random number comes from the ``generator`` passed in, drawn on the generator's device and
then moved to the images' device: a CPU generator gives the same parameters for a CPU and a
CUDA batch, so one seed means one augmentation sequence wherever it runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from skinml.data.image_config import AugmentConfig, ImageConfig

_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
_BLUR_SIGMA = (0.1, 2.0)  # torchvision GaussianBlur's default sigma range
_ERASE_SCALE = (0.02, 0.33)  # torchvision RandomErasing's defaults
_ERASE_RATIO = (0.3, 3.3)
_ERASE_ATTEMPTS = 10
# Colour-jitter operations, in the index order torchvision's ColorJitter permutes.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


@dataclass
class AugmentParams:
    """The random parameters of one batch, one row per sample (all tensors of length B).

    Exposed so that tests can compare their distribution with torchvision's, and so that a
    caller can replay a batch.
    """

    crop_top: torch.Tensor  # long, pixel offsets into the resize x resize image
    crop_left: torch.Tensor
    hflip: torch.Tensor  # bool
    vflip: torch.Tensor
    jitter_order: torch.Tensor  # long (B, 4): a permutation of BRIGHTNESS..HUE
    brightness: torch.Tensor  # float factors; 1 (0 for hue) is the identity
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    angle: torch.Tensor  # degrees, counter-clockwise
    translate_x: torch.Tensor  # long pixels, as torchvision rounds them
    translate_y: torch.Tensor
    scale: torch.Tensor
    blur: torch.Tensor  # bool
    blur_sigma: torch.Tensor
    erase: torch.Tensor  # bool: erasing drawn and a box fitted in 10 attempts
    erase_top: torch.Tensor  # long box; meaningful where ``erase``
    erase_left: torch.Tensor
    erase_height: torch.Tensor
    erase_width: torch.Tensor

    def to(self, device: torch.device | str) -> AugmentParams:
        return AugmentParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


class BatchAugment:
    """Batched equivalent of ``build_train_transform(image_config, augment_config)``.

    ``augment(images, generator)`` takes a uint8 tensor ``(B, 3, resize, resize)`` on any
    device and returns float32 ``(B, 3, image_size, image_size)``, normalised with the image
    config's mean and std. The same generator state gives the same output. ``augment.resize=0``
    means the photo is decoded at ``image_size`` (the whole photo, no crop), as the training
    loader decodes it.
    """

    def __init__(self, image_config: ImageConfig, augment_config: AugmentConfig):
        self.image_config = image_config
        self.augment = augment_config
        if augment_config.blur_kernel and augment_config.blur_kernel % 2 == 0:
            raise ValueError(f"augment.blur_kernel must be odd, got {augment_config.blur_kernel}.")
        if min(augment_config.scale) <= 0:
            raise ValueError(f"augment.scale must be positive, got {augment_config.scale}.")

    @property
    def input_size(self) -> int:
        """The side of the uint8 images this takes: ``augment.resize``, or ``image_size`` for 0."""
        return self.augment.decode_size(self.image_config.image_size)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        self._check(images)
        params = self.sample_params(images.shape[0], generator).to(images.device)
        return self.apply(images, params)

    # --- parameters -----------------------------------------------------------------------------

    def sample_params(self, batch_size: int, generator: torch.Generator) -> AugmentParams:
        """Draw every sample's parameters from the distributions torchvision's transforms use."""
        a, size = self.augment, self.image_config.image_size
        n, gen = batch_size, generator

        def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
            u = torch.rand(n, *shape, generator=gen, device=gen.device)
            return low + (high - low) * u

        def integers(upper_exclusive: torch.Tensor | int) -> torch.Tensor:
            # Uniform on {0, ..., upper - 1}, per sample.
            return (torch.rand(n, generator=gen, device=gen.device) * upper_exclusive).long()

        def coin(p: float) -> torch.Tensor:
            return torch.rand(n, generator=gen, device=gen.device) < p

        slack = max(self.input_size - size, 0)  # crops only when the cache is larger than the model input
        crop_top, crop_left = integers(slack + 1), integers(slack + 1)
        hflip, vflip = coin(a.hflip), coin(a.vflip)
        # argsort of i.i.d. uniforms is a uniformly random permutation, like torch.randperm(4).
        jitter_order = torch.rand(n, 4, generator=gen, device=gen.device).argsort(dim=1)
        brightness = uniform(max(0.0, 1 - a.brightness), 1 + a.brightness)
        contrast = uniform(max(0.0, 1 - a.contrast), 1 + a.contrast)
        saturation = uniform(max(0.0, 1 - a.saturation), 1 + a.saturation)
        hue = uniform(-a.hue, a.hue)
        angle = uniform(-a.rotation, a.rotation)
        max_shift = a.translate * size
        translate_x = uniform(-max_shift, max_shift).round().long()
        translate_y = uniform(-max_shift, max_shift).round().long()
        scale = uniform(float(a.scale[0]), float(a.scale[1]))
        blur = coin(a.blur_p) if a.blur_kernel else torch.zeros(n, dtype=torch.bool, device=gen.device)
        blur_sigma = uniform(*_BLUR_SIGMA)
        erase, top, left, height, width = self._sample_erasing(n, gen, size)
        return AugmentParams(crop_top, crop_left, hflip, vflip, jitter_order, brightness, contrast,
                             saturation, hue, angle, translate_x, translate_y, scale, blur, blur_sigma,
                             erase, top, left, height, width)

    def _sample_erasing(self, n: int, gen: torch.Generator, size: int):
        """RandomErasing's box: up to 10 (area, aspect) draws, the first that fits is used."""
        wanted = torch.rand(n, generator=gen, device=gen.device) < self.augment.erasing_p
        area = size * size * (_ERASE_SCALE[0] + (_ERASE_SCALE[1] - _ERASE_SCALE[0])
                              * torch.rand(n, _ERASE_ATTEMPTS, generator=gen, device=gen.device, dtype=torch.float64))
        log_low, log_high = math.log(_ERASE_RATIO[0]), math.log(_ERASE_RATIO[1])
        aspect = torch.exp(log_low + (log_high - log_low)
                           * torch.rand(n, _ERASE_ATTEMPTS, generator=gen, device=gen.device, dtype=torch.float64))
        heights = (area * aspect).sqrt().round().long()
        widths = (area / aspect).sqrt().round().long()
        fits = (heights < size) & (widths < size)
        first = fits.long().argmax(dim=1, keepdim=True)  # index of the first fitting attempt
        height = heights.gather(1, first).squeeze(1)
        width = widths.gather(1, first).squeeze(1)
        top = (torch.rand(n, generator=gen, device=gen.device) * (size - height + 1)).long()
        left = (torch.rand(n, generator=gen, device=gen.device) * (size - width + 1)).long()
        return wanted & fits.any(dim=1), top, left, height, width

    # --- application ----------------------------------------------------------------------------

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Augment ``images`` with given parameters (on the images' device)."""
        self._check(images)
        a, size = self.augment, self.image_config.image_size
        if self.input_size >= size:
            x = _crop(images, params.crop_top, params.crop_left, size).float()
        else:
            x = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True,
                              align_corners=False).round().clamp(0, 255)
        # Values stay on the 0..255 grid until normalisation, rounded as torchvision rounds uint8.
        # ColorJitter leaves out an operation whose range is zero; so does this.
        enabled = {op for op, amount in zip((BRIGHTNESS, CONTRAST, SATURATION, HUE),
                                            (a.brightness, a.contrast, a.saturation, a.hue)) if amount}
        if enabled:
            x = _color_jitter(x, params, enabled)
        x = _flip_rotate_affine(x, params)
        if params.blur.any():
            x = _blur_some(x, params.blur, params.blur_sigma, a.blur_kernel)
        mean = torch.tensor(self.image_config.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.image_config.std, device=x.device).view(1, 3, 1, 1)
        x = (x / 255.0 - mean) / std
        if params.erase.any():
            x = _erase(x, params)
        return x

    def _check(self, images: torch.Tensor) -> None:
        r = self.input_size
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
            raise TypeError(f"BatchAugment takes a uint8 tensor, got {getattr(images, 'dtype', type(images))}.")
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, r, r):
            raise ValueError(
                f"BatchAugment takes images of shape (B, 3, {r}, {r}) (augment.resize={self.augment.resize}, "
                f"image_size={self.image_config.image_size}), "
                f"got {tuple(images.shape)}."
            )


def _crop(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int) -> torch.Tensor:
    b, c, h, w = images.shape
    offsets = torch.arange(size, device=images.device)
    rows = (top[:, None] + offsets)[:, :, None]
    cols = (left[:, None] + offsets)[:, None, :]
    index = (rows * w + cols).view(b, 1, size * size).expand(b, c, -1)
    return images.reshape(b, c, h * w).gather(2, index).view(b, c, size, size)


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=1)
    # torchvision floors the grey level of uint8 images before blending with it.
    return (r * _GRAY_WEIGHTS[0] + g * _GRAY_WEIGHTS[1] + b * _GRAY_WEIGHTS[2]).floor().unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    factor = factor.view(-1, 1, 1, 1)
    return (x * factor + other * (1 - factor)).clamp(0, 255).floor()  # uint8 cast truncates


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by ``shift`` turns per sample, on 0..255 values, as adjust_hue does."""
    value = x.amax(dim=1)
    chroma = value - x.amin(dim=1)
    r, g, b = x.unbind(dim=1)
    # Hue in sixths of a turn times the chroma; the first matching maximum wins (red, then
    # green), as in torchvision (after PIL). Grey pixels (chroma 0) get hue 0.
    scaled = torch.where(value == r, g - b, torch.where(value == g, b - r + 2 * chroma, r - g + 4 * chroma))
    sixths = scaled / torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    sixths = torch.remainder(sixths + 6 * shift.view(-1, 1, 1), 6.0)
    # HSV -> RGB: channel n (5, 3, 1 for red, green, blue) = value - chroma * clamp(min(k, 4 - k), 0, 1)
    # with k = (n + hue in sixths) mod 6; value - chroma is the minimum, value the maximum.
    n = torch.tensor((5.0, 3.0, 1.0), device=x.device).view(1, 3, 1, 1)
    k = torch.remainder(sixths.unsqueeze(1) + n, 6.0)
    ramp = torch.minimum(k, 4 - k).clamp_(0, 1)
    out = value.unsqueeze(1) - chroma.unsqueeze(1) * ramp
    # torchvision's float -> uint8 conversion: scale to [0, 1], multiply by 256 - 1e-3, truncate.
    return (out.clamp_(0, 255) * ((256.0 - 1e-3) / 255.0)).floor_()


def _color_jitter(x: torch.Tensor, p: AugmentParams, enabled: set[int]) -> torch.Tensor:
    """Four operations per sample, in that sample's order: each step updates only the samples
    whose permutation puts that operation there, so every sample sees each operation once."""
    x = x.clone()
    for position in range(4):
        for operation in enabled:
            rows = (p.jitter_order[:, position] == operation).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            part = x.index_select(0, rows)
            if operation == BRIGHTNESS:
                part = _blend(part, torch.zeros_like(part), p.brightness[rows])
            elif operation == CONTRAST:
                mean = _gray(part).mean(dim=(1, 2, 3), keepdim=True)
                part = _blend(part, mean, p.contrast[rows])
            elif operation == SATURATION:
                part = _blend(part, _gray(part), p.saturation[rows])
            else:
                part = _adjust_hue(part, p.hue[rows])
            x.index_copy_(0, rows, part)
    return x


def _flip_rotate_affine(x: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    """Flips, rotation (nearest, zero fill), then translate/scale (nearest, zero fill), as one
    gather: for every output pixel, find the rotated image's nearest pixel the affine step reads,
    then the cropped image's nearest pixel the rotation read there."""
    b, c, h, w = x.shape
    device = x.device
    ys = torch.arange(h, device=device, dtype=torch.float32) - (h - 1) / 2  # pixel centres,
    xs = torch.arange(w, device=device, dtype=torch.float32) - (w - 1) / 2  # origin at the centre
    out_y, out_x = ys.view(1, h, 1), xs.view(1, 1, w)

    scale = p.scale.float().view(b, 1, 1)
    # Inverse of the affine step (output = scale * source + translation).
    src_x = (out_x - p.translate_x.float().view(b, 1, 1)) / scale
    src_y = (out_y - p.translate_y.float().view(b, 1, 1)) / scale
    col = torch.round(src_x + (w - 1) / 2)  # round half to even, like grid_sample's nearest
    row = torch.round(src_y + (h - 1) / 2)
    inside = (col >= 0) & (col <= w - 1) & (row >= 0) & (row <= h - 1)

    # Inverse rotation of that pixel's centre (counter-clockwise angle, y pointing down).
    theta = torch.deg2rad(p.angle.float()).view(b, 1, 1)
    cos, sin = torch.cos(theta), torch.sin(theta)
    cx, cy = col - (w - 1) / 2, row - (h - 1) / 2
    rot_x = cos * cx - sin * cy
    rot_y = sin * cx + cos * cy
    col = torch.round(rot_x + (w - 1) / 2)
    row = torch.round(rot_y + (h - 1) / 2)
    inside &= (col >= 0) & (col <= w - 1) & (row >= 0) & (row <= h - 1)

    col = col.clamp(0, w - 1).long()
    row = row.clamp(0, h - 1).long()
    # The flips came first, so the rotation read the flipped image.
    col = torch.where(p.hflip.view(b, 1, 1), w - 1 - col, col)
    row = torch.where(p.vflip.view(b, 1, 1), h - 1 - row, row)
    index = (row * w + col).view(b, 1, h * w).expand(b, c, -1)
    out = x.reshape(b, c, h * w).gather(2, index).view(b, c, h, w)
    return out * inside.unsqueeze(1)


def _blur_some(x: torch.Tensor, chosen: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    rows = chosen.nonzero().squeeze(1)
    part = x.index_select(0, rows)
    n, c, h, w = part.shape
    offsets = torch.arange(kernel_size, device=x.device, dtype=torch.float32) - (kernel_size - 1) / 2
    kernel_1d = torch.softmax(-(offsets.view(1, -1) ** 2) / (2 * sigma[rows].float().view(-1, 1) ** 2), dim=1)
    kernel_2d = kernel_1d[:, :, None] * kernel_1d[:, None, :]  # (n, k, k), one per sample
    weight = kernel_2d.repeat_interleave(c, dim=0).unsqueeze(1)  # (n * c, 1, k, k)
    pad = kernel_size // 2
    padded = F.pad(part.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    blurred = F.conv2d(padded, weight, groups=n * c).view(n, c, h, w).round()
    out = x.clone()
    out.index_copy_(0, rows, blurred)
    return out


def _erase(x: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    b, _, h, w = x.shape
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    top, left = p.erase_top.view(b, 1, 1), p.erase_left.view(b, 1, 1)
    in_rows = (rows >= top) & (rows < top + p.erase_height.view(b, 1, 1))
    in_cols = (cols >= left) & (cols < left + p.erase_width.view(b, 1, 1))
    box = in_rows & in_cols & p.erase.view(b, 1, 1)
    return x.masked_fill(box.unsqueeze(1), 0.0)
