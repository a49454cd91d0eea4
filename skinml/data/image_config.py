"""What turns a photo into a model input: plain settings, no torch (cheap to import).

:class:`ImageConfig` is the evaluation view (shared by evaluation, serving and the app);
:class:`AugmentConfig` is the training augmentation a recipe carries.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

#: Refuse images above this many pixels (decompression bombs). PAD-UFES-20 photos are < 10 MP.
DEFAULT_MAX_PIXELS = 50_000_000

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImageConfig:
    """Everything needed to turn a photo into the tensor a model expects."""

    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    max_pixels: int = DEFAULT_MAX_PIXELS

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, state: dict) -> ImageConfig:
        return cls(
            image_size=int(state["image_size"]),
            mean=tuple(float(x) for x in state["mean"]),
            std=tuple(float(x) for x in state["std"]),
            max_pixels=int(state.get("max_pixels", DEFAULT_MAX_PIXELS)),
        )


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation (the original recipe's values are the defaults)."""

    resize: int = 257
    hflip: float = 0.5
    vflip: float = 0.5
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.05
    rotation: float = 20.0
    translate: float = 0.1
    scale: tuple[float, float] = field(default=(0.9, 1.1))
    blur_kernel: int = 3
    blur_p: float = 0.2
    erasing_p: float = 0.2
