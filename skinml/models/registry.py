"""One way in: models are registered by name and built with :func:`create_model`.

Every registered model is a :class:`SkinClassifier`: ``forward(image, metadata)`` returns logits
``(B, NUM_CLASSES)`` in ``schema.LABELS`` order, and the model records what was built
(``config``), from which weights (``weights_source``) and with which input normalisation
(``data_config``), so a checkpoint can be rebuilt and served with the same preprocessing.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterable
from typing import ClassVar, TypeVar

import torch
from torch import nn

FAMILIES: tuple[str, ...] = ("fusion", "baseline")

_MODELS: dict[str, type[SkinClassifier]] = {}
_Model = TypeVar("_Model", bound="type[SkinClassifier]")


class SkinClassifier(nn.Module):
    """What every registered model exposes, on top of ``forward(image, metadata)``.

    Subclasses set, in ``__init__``: ``num_metadata_features``, ``options`` (every option,
    resolved, JSON-able), ``weights_source``, ``data_config``, ``backbone_names``, and return
    the pretrained image backbones from :meth:`image_backbones`.
    """

    model_name: ClassVar[str]
    family: ClassVar[str]
    #: What the model consumes, so callers never branch on model names.
    uses_images: ClassVar[bool] = True
    uses_metadata: ClassVar[bool] = True
    #: The constructor option that names the CNN backbone (None: no image backbone).
    backbone_option: ClassVar[str | None] = "backbone"
    #: Options that load pretrained weights (set to "none" when rebuilding from a checkpoint).
    weights_options: ClassVar[tuple[str, ...]] = ()

    num_metadata_features: int
    options: dict
    weights_source: str
    data_config: dict
    backbone_names: tuple[str, ...]

    @property
    def backbone_name(self) -> str:
        return "+".join(self.backbone_names) or "none"

    @property
    def config(self) -> dict:
        """Enough to rebuild the architecture: see :func:`create_model_from_config`."""
        return {
            "name": self.model_name,
            "num_metadata_features": self.num_metadata_features,
            "options": copy.deepcopy(self.options),
        }

    def image_backbones(self) -> list[nn.Module]:
        return []

    def get_classifier(self) -> nn.Linear:
        """The last layer, whose outputs are the ``schema.LABELS`` logits."""
        raise NotImplementedError

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters split for different learning rates.

        ``"backbone"``: the pretrained image backbones; ``"head"``: everything learned from
        scratch (metadata MLP, projections, attention, classifier). Frozen parameters are left
        out so the groups can go straight into an optimiser.
        """
        in_backbone = {id(p) for module in self.image_backbones() for p in module.parameters()}
        groups: dict[str, list[nn.Parameter]] = {"backbone": [], "head": []}
        for parameter in self.parameters():
            if parameter.requires_grad:
                groups["backbone" if id(parameter) in in_backbone else "head"].append(parameter)
        return groups

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Keep only the image backbones' block boundaries for the backward pass and recompute
        the rest (timm's ``set_grad_checkpointing``): less memory for one more forward pass.

        The recomputed forward updates BatchNorm's running statistics a second time; the
        training loop puts them back (:func:`skinml.training.loop.train_one_epoch`).
        """
        backbones = self.image_backbones()
        if enable and not backbones:
            raise ValueError(f"{self.model_name} has no image backbone whose activations could be recomputed")
        for backbone in backbones:
            setter = getattr(backbone, "set_grad_checkpointing", None)
            if setter is None:
                raise ValueError(f"backbone {type(backbone).__name__} of {self.model_name} cannot recompute "
                                 "activations (no set_grad_checkpointing)")
            setter(enable)

    @property
    def grad_checkpointing(self) -> bool:
        return any(getattr(b, "grad_checkpointing", False) for b in self.image_backbones())


def register_model(name: str, family: str) -> Callable[[_Model], _Model]:
    """Class decorator adding a model to the registry under ``name``."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")

    def register(cls: _Model) -> _Model:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered by {_MODELS[name].__name__}")
        cls.model_name = name
        cls.family = family
        _MODELS[name] = cls
        return cls

    return register


def model_names() -> tuple[str, ...]:
    return tuple(_MODELS)


def model_options(name: str) -> dict[str, object]:
    """The options model ``name`` accepts, with their defaults."""
    signature = inspect.signature(_model_class(name).__init__)
    return {
        parameter.name: parameter.default
        for parameter in signature.parameters.values()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    }


def create_model(name: str, num_metadata_features: int, **options) -> SkinClassifier:
    """Build the registered model ``name`` for ``num_metadata_features`` metadata inputs.

    Unknown names and options raise ValueError listing what exists; weights that cannot be
    had raise ``PretrainedWeightsUnavailable``.
    """
    accepted = model_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        listing = ", ".join(f"{key}={value!r}" for key, value in accepted.items())
        raise ValueError(
            f"Unknown option(s) for model {name!r}: {', '.join(unknown)}. Accepted options "
            f"(with defaults): {listing}."
        )
    return _model_class(name)(num_metadata_features, **options)


def create_model_from_config(config: dict) -> SkinClassifier:
    """Rebuild the architecture a ``model.config`` describes, with no pretrained weights
    loaded (they would be overwritten by the checkpoint's state dict anyway)."""
    cls = _model_class(config["name"])
    options = dict(config["options"])
    for option in cls.weights_options:
        options[option] = "none"
    return create_model(config["name"], config["num_metadata_features"], **options)


def describe_models(num_metadata_features: int = 21, **options) -> list[dict]:
    """One row per registered model: ``name``, ``family``, ``backbone`` (names joined by "+",
    "none" without an image backbone), ``backbones`` (list), ``parameters`` and ``description``.

    Each model is built with the given options it accepts (others are ignored; an option no
    model accepts is an error) and without pretrained weights, on the meta device so that
    describing the big ViT costs no memory or download.
    """
    known = {key for name in _MODELS for key in model_options(name)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"Unknown option(s): {', '.join(unknown)}. Options any model accepts: {', '.join(sorted(known))}."
        )
    rows = []
    for name, cls in _MODELS.items():
        accepted = model_options(name)
        chosen = {key: value for key, value in options.items() if key in accepted}
        chosen.update({option: "none" for option in cls.weights_options})
        with torch.device("meta"):
            model = create_model(name, num_metadata_features, **chosen)
        rows.append(
            {
                "name": name,
                "family": cls.family,
                "backbone": model.backbone_name,
                "backbones": list(model.backbone_names),
                "parameters": sum(p.numel() for p in model.parameters()),
                "description": (inspect.getdoc(cls) or "").splitlines()[0],
            }
        )
    return rows


def model_class(name: object) -> type[SkinClassifier]:
    """The registered class of ``name`` (its ``family``, ``uses_images``, ``backbone_option``)."""
    return _model_class(name)


def _model_class(name: object) -> type[SkinClassifier]:
    if not isinstance(name, str) or name not in _MODELS:
        raise ValueError(f"Unknown model {name!r}. Available models: {', '.join(_MODELS)}.")
    return _MODELS[name]


# --- option checks shared by the model constructors -------------------------------------------


def check_num_metadata_features(value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"num_metadata_features must be an integer >= {minimum}, got {value!r}.")
    return value


def check_probability(option: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{option} must be a number in [0, 1), got {value!r}.")
    return float(value)


def check_positive_int(option: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{option} must be a positive integer, got {value!r}.")
    return value


_DATA_CONFIG_KEYS = ("mean", "std", "input_size", "interpolation")


def check_data_config(value: object) -> dict | None:
    """Accept ``None`` (take the weights' own) or a complete data config, tuples or lists."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != set(_DATA_CONFIG_KEYS):
        raise ValueError(
            f"data_config must be None or a dict with exactly the keys {_DATA_CONFIG_KEYS}, got {value!r}."
        )
    try:
        config = {
            "mean": _three_floats(value["mean"]),
            "std": _three_floats(value["std"]),
            "input_size": int(value["input_size"]),
            "interpolation": str(value["interpolation"]),
        }
    except (TypeError, ValueError) as error:
        raise ValueError(f"data_config is malformed ({error}): {value!r}") from error
    if config["input_size"] < 1 or min(config["std"]) <= 0:
        raise ValueError(f"data_config needs input_size >= 1 and positive std, got {value!r}.")
    return config


def _three_floats(values: Iterable) -> tuple[float, float, float]:
    floats = tuple(float(v) for v in values)
    if len(floats) != 3:
        raise ValueError("mean and std need one value per RGB channel")
    return floats  # type: ignore[return-value]


def json_data_config(config: dict) -> dict:
    """The data config as plain JSON types, for ``options``."""
    return {**config, "mean": list(config["mean"]), "std": list(config["std"])}
