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
    """Everything needed to turn a photo into the tensor a model expects.

    The view: the whole photo is squashed (bilinear) to ``decode_size`` x ``decode_size``, then
    the centre ``image_size`` x ``image_size`` is kept. ``resize=0`` (the original design)
    squashes straight to ``image_size``; ``resize`` = the training recipe's ``augment.resize``
    shows the lesion at the scale training's random crops did (torchvision's evaluation presets).
    """

    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    max_pixels: int = DEFAULT_MAX_PIXELS
    resize: int = 0

    def __post_init__(self) -> None:
        if self.resize and self.resize < self.image_size:
            raise ValueError(f"resize ({self.resize}) must be 0 or >= image_size ({self.image_size})")

    @property
    def decode_size(self) -> int:
        """The side the photo is squashed to before the centre crop."""
        return max(self.resize, self.image_size)

    @property
    def crop_offset(self) -> int:
        """Top/left offset of the centre crop in the decoded image (torchvision's CenterCrop)."""
        return int(round((self.decode_size - self.image_size) / 2.0))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, state: dict) -> ImageConfig:
        return cls(
            image_size=int(state["image_size"]),
            mean=tuple(float(x) for x in state["mean"]),
            std=tuple(float(x) for x in state["std"]),
            max_pixels=int(state.get("max_pixels", DEFAULT_MAX_PIXELS)),
            resize=int(state.get("resize", 0)),  # checkpoints before the option: squash
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

    def decode_size(self, image_size: int) -> int:
        """The side training photos are decoded (squashed) to before the random crop.

        ``resize``; 0 means ``image_size``: the whole photo, no crop (the evaluation's squash
        view), whatever the backbone's input size.
        """
        return self.resize or image_size
