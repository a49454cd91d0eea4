"""Image transform presets: one definition for training, evaluation and the served model.

The evaluation path is: decode -> RGB -> square bilinear resize to ``decode_size`` (uint8) ->
centre crop ``image_size`` (when ``resize`` is set) -> float in [0, 1] -> normalise with the
backbone's mean/std. Training decodes once to
``train_resize`` and augments from the cached uint8 array.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms import v2

from skinml.data.image_config import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig, ImageConfig  # noqa: F401
from skinml.data.images import open_image, resize_to_array


def _normalize(config: ImageConfig) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(config.mean), list(config.std))]


def uint8_to_tensor(array: np.ndarray) -> torch.Tensor:
    """HWC uint8 array -> CHW uint8 tensor (no copy of pixel values beyond the permute)."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


def build_eval_transform(config: ImageConfig) -> v2.Compose:
    """Acts on a CHW uint8 tensor already resized to ``config.decode_size``."""
    crop = [v2.CenterCrop(config.image_size)] if config.decode_size > config.image_size else []
    return v2.Compose(crop + _normalize(config))


def build_train_transform(config: ImageConfig, augment: AugmentConfig) -> v2.Compose:
    """Acts on a CHW uint8 tensor resized to ``augment.decode_size(config.image_size)``."""
    decoded = augment.decode_size(config.image_size)
    steps: list = [v2.RandomCrop(config.image_size)] if decoded > config.image_size else []
    if decoded < config.image_size:
        steps.append(v2.Resize((config.image_size, config.image_size), antialias=True))
    if augment.hflip:
        steps.append(v2.RandomHorizontalFlip(augment.hflip))
    if augment.vflip:
        steps.append(v2.RandomVerticalFlip(augment.vflip))
    if any((augment.brightness, augment.contrast, augment.saturation, augment.hue)):
        steps.append(v2.ColorJitter(augment.brightness, augment.contrast, augment.saturation, augment.hue))
    if augment.rotation:
        steps.append(v2.RandomRotation(augment.rotation))
    if augment.translate or tuple(augment.scale) != (1.0, 1.0):
        steps.append(v2.RandomAffine(degrees=0, translate=(augment.translate,) * 2, scale=tuple(augment.scale)))
    if augment.blur_kernel and augment.blur_p:
        steps.append(v2.RandomApply([v2.GaussianBlur(augment.blur_kernel)], p=augment.blur_p))
    steps += _normalize(config)
    if augment.erasing_p:
        steps.append(v2.RandomErasing(p=augment.erasing_p))
    return v2.Compose(steps)


def prepare_image(source: str | bytes, config: ImageConfig, name: str | None = None) -> torch.Tensor:
    """Photo (path or encoded bytes) -> normalised CHW float tensor, exactly as in evaluation."""
    array = resize_to_array(open_image(source, name=name, max_pixels=config.max_pixels), config.decode_size)
    return build_eval_transform(config)(uint8_to_tensor(array))
