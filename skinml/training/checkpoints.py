"""Checkpoints: everything needed to resume a run, or to score with its selected model.

A checkpoint is one ``torch.save`` dict. The inference part (model config and weights, fitted
preprocessor state, label order, image config) is plain data, so evaluate, register and the
served model rebuild the model without the training code's objects.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from skinml.data import schema
from skinml.data.preprocess import MetadataPreprocessor
from skinml.data.transforms import ImageConfig

BEST = "checkpoints/best.pt"
LAST = "checkpoints/last.pt"
FORMAT_VERSION = 1


def inference_state(model: nn.Module, preprocessor: MetadataPreprocessor, image_config: ImageConfig | None) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "model_config": model.config,
        "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "weights_source": getattr(model, "weights_source", "unknown"),
        "preprocessor": preprocessor.to_dict(),
        "labels": list(schema.LABELS),
        "image_config": image_config.to_dict() if image_config else None,
    }


def save(state: dict[str, Any], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint behind
    return path


def load(path: str | os.PathLike) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint '{path}' has format {state.get('format_version')!r}, expected {FORMAT_VERSION}")
    if list(state["labels"]) != list(schema.LABELS):
        raise ValueError(f"checkpoint '{path}' was trained with labels {state['labels']}, this code uses {list(schema.LABELS)}")
    return state


@dataclass
class InferenceBundle:
    """A model ready to score, with the exact preprocessing it was trained with."""

    model: nn.Module
    preprocessor: MetadataPreprocessor
    image_config: ImageConfig | None
    labels: list[str]
    weights_source: str

    @property
    def uses_images(self) -> bool:
        return self.image_config is not None


def build_inference_bundle(state: dict[str, Any]) -> InferenceBundle:
    from skinml.models import create_model_from_config

    model = create_model_from_config(state["model_config"])
    model.load_state_dict(state["model_state"])
    model.eval()
    image_config = ImageConfig.from_dict(state["image_config"]) if state.get("image_config") else None
    return InferenceBundle(
        model=model,
        preprocessor=MetadataPreprocessor.from_dict(state["preprocessor"]),
        image_config=image_config,
        labels=list(state["labels"]),
        weights_source=state.get("weights_source", "unknown"),
    )
