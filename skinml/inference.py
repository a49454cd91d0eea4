"""Scoring with a trained model: the one place evaluation, serving, registry and the app share.

A checkpoint is one ``torch.save`` dict of plain data. Its inference part (model config and
weights, fitted preprocessor, label order, image config) rebuilds an :class:`InferenceBundle`
without any training object; :func:`predict_proba` is the one batched forward pass (device and
autocast chosen here), so every caller gets the same probabilities for the same inputs.

Nothing here imports MLflow or the training code.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from skinml.data import schema
from skinml.data.dataset import LesionDataset, build_split_arrays
from skinml.data.preprocess import MetadataPreprocessor
from skinml.data.transforms import ImageConfig, build_eval_transform

#: Artifact paths of a training run's checkpoints.
BEST = "checkpoints/best.pt"
LAST = "checkpoints/last.pt"
FORMAT_VERSION = 1


# -- checkpoints --------------------------------------------------------------------------------


def inference_state(model: nn.Module, preprocessor: MetadataPreprocessor, image_config: ImageConfig | None) -> dict[str, Any]:
    """The part of a checkpoint that scoring needs (plain data only)."""
    return {
        "format_version": FORMAT_VERSION,
        "model_config": model.config,
        "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "weights_source": getattr(model, "weights_source", "unknown"),
        "preprocessor": preprocessor.to_dict(),
        "labels": list(schema.LABELS),
        "image_config": image_config.to_dict() if image_config else None,
    }


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint behind
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint`, checked for format and label order.

    Loaded with ``weights_only=True``: checkpoints hold tensors and plain Python data only, so
    a tampered file cannot run code when it is opened.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # pickle errors, truncated files, non-plain objects
        raise ValueError(f"checkpoint '{path}' cannot be read as plain data: {exc}") from exc
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        found = state.get("format_version") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"checkpoint '{path}' has format {found!r}, expected {FORMAT_VERSION}")
    if list(state["labels"]) != list(schema.LABELS):
        raise ValueError(f"checkpoint '{path}' was trained with labels {state['labels']}, this code uses {list(schema.LABELS)}")
    return state


#: Test-time augmentation choices: none, or the four flips training draws (identity, horizontal,
#: vertical, both).
TTA_CHOICES = ("none", "flips")


class AveragedModel(nn.Module):
    """Mean class probabilities of ``members`` (an ensemble), each over the flipped views of the
    photo when ``tta="flips"``.

    ``forward`` returns the log of that mean, so ``softmax(forward(x, m))`` is exactly the mean of
    the members' (and views') softmax outputs: every scorer that takes a softmax of logits
    (evaluation, serving, the app) gets the averaged probabilities unchanged.
    """

    def __init__(self, members: list[nn.Module], tta: str = "none") -> None:
        super().__init__()
        if not members:
            raise ValueError("an averaged model needs at least one member")
        if tta not in TTA_CHOICES:
            raise ValueError(f"tta must be one of {TTA_CHOICES}, got {tta!r}")
        self.members = nn.ModuleList(members)
        self.tta = tta
        self.uses_images = bool(getattr(members[0], "uses_images", True))
        self.uses_metadata = bool(getattr(members[0], "uses_metadata", True))
        self.num_metadata_features = getattr(members[0], "num_metadata_features", 0)

    def image_backbones(self):
        """Every member's backbones (for holding the photo's features fixed while explaining the
        metadata); none with flips, whose views need features of their own."""
        if self.tta != "none":
            return
        for member in self.members:
            if hasattr(member, "image_backbones"):
                yield from member.image_backbones()

    def views(self, image: torch.Tensor) -> list[torch.Tensor]:
        if self.tta == "none" or not self.uses_images or image.shape[-1] <= 1:
            return [image]
        return [image, image.flip(-1), image.flip(-2), image.flip((-2, -1))]

    def member_probabilities(self, image: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
        """(members x views, B, classes) softmax outputs."""
        return torch.stack([torch.softmax(member(view, metadata).float(), dim=1)
                            for member in self.members for view in self.views(image)])

    def forward(self, image: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
        mean = self.member_probabilities(image, metadata).mean(0)
        return torch.log(mean.clamp_min(torch.finfo(mean.dtype).tiny))


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


def model_name(state: dict[str, Any]) -> str:
    """The model a checkpoint holds ("cnn_fusion"; "cnn_fusion x5" for an ensemble of five)."""
    if "members" in state:
        return f"{state['members'][0]['model_config']['name']} x{len(state['members'])}"
    return state["model_config"]["name"]


def ensemble_state(members: list[dict[str, Any]], tta: str = "none", sources: list[str] | None = None) -> dict[str, Any]:
    """One checkpoint holding several members' inference states (same preprocessing and view)."""
    if not members:
        raise ValueError("an ensemble needs at least one member checkpoint")
    first = members[0]
    for i, member in enumerate(members[1:], start=1):
        for key in ("preprocessor", "image_config", "labels"):
            if member.get(key) != first.get(key):
                name = (sources or [])[i] if sources and i < len(sources) else f"member {i}"
                raise ValueError(f"{name} has a different {key} than the first member: an ensemble averages "
                                 "models that read the same inputs the same way")
    return {
        "format_version": FORMAT_VERSION,
        "members": [{k: m[k] for k in ("model_config", "model_state", "weights_source")} for m in members],
        "member_sources": list(sources or []),
        "tta": tta,
        "preprocessor": first["preprocessor"],
        "labels": first["labels"],
        "image_config": first["image_config"],
        "weights_source": first.get("weights_source", "unknown"),
    }


def _build_model(member: dict[str, Any]) -> nn.Module:
    from skinml.models import create_model_from_config

    model = create_model_from_config(member["model_config"])
    model.load_state_dict(member["model_state"])
    return model.eval()


def build_inference_bundle(state: dict[str, Any], tta: str | None = None) -> InferenceBundle:
    """The bundle of a checkpoint; an ensemble checkpoint (``members``) or a ``tta`` other than
    "none" (here or in the checkpoint) gives an :class:`AveragedModel`."""
    tta = tta or state.get("tta", "none")
    if "members" in state:
        model: nn.Module = AveragedModel([_build_model(m) for m in state["members"]], tta).eval()
    else:
        model = _build_model(state)
        if tta != "none":
            model = AveragedModel([model], tta).eval()
    return _bundle(model, state)


def _bundle(model: nn.Module, state: dict[str, Any]) -> InferenceBundle:
    uses_images = getattr(model, "uses_images", True)
    image_config = ImageConfig.from_dict(state["image_config"]) if state.get("image_config") and uses_images else None
    return InferenceBundle(
        model=model,
        preprocessor=MetadataPreprocessor.from_dict(state["preprocessor"]),
        image_config=image_config,
        labels=list(state["labels"]),
        weights_source=state.get("weights_source", "unknown"),
    )


def load_bundle(path: str | os.PathLike) -> InferenceBundle:
    return build_inference_bundle(load_checkpoint(path))


# -- device and precision -----------------------------------------------------------------------


def pick_device(name: str | torch.device = "auto") -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device):
    """bfloat16 autocast on CUDA; full precision on CPU (bf16 on these CPUs is slower)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(image: torch.Tensor, metadata: torch.Tensor, device: torch.device):
    non_blocking = device.type == "cuda"
    image = image.to(device, non_blocking=non_blocking)
    if image.dim() == 4 and image.shape[-1] > 1:
        image = image.contiguous(memory_format=torch.channels_last)
    return image, metadata.to(device, non_blocking=non_blocking)


# -- scoring ------------------------------------------------------------------------------------


def _forward_proba(model: nn.Module, image: torch.Tensor, metadata: torch.Tensor, device: torch.device):
    """Logits and probabilities of one batch (the one forward pass every scorer uses)."""
    image, metadata = to_device(image, metadata, device)
    with autocast(device):
        logits = model(image, metadata).float()
    return logits, torch.softmax(logits, dim=1)


@torch.no_grad()
def predict_proba(model: nn.Module, loader, device: torch.device, criterion=None, progress=None):
    """Class probabilities for every row of ``loader`` (in order), and the mean loss if asked.

    ``loader`` yields ``(image, metadata, target)``; ``progress`` may wrap it (a tqdm bar).
    """
    model.eval()
    probabilities, total_loss, seen = [], 0.0, 0
    for image, metadata, target in (progress(loader) if progress else loader):
        logits, proba = _forward_proba(model, image, metadata, device)
        if criterion is not None:
            total_loss += criterion(logits, target.to(device)).item() * len(target)
            seen += len(target)
        probabilities.append(proba.cpu().numpy())
    proba = np.concatenate(probabilities) if probabilities else np.zeros((0, len(schema.LABELS)))
    return proba, (total_loss / seen if seen else float("nan"))


@torch.inference_mode()
def predict_tensors(model: nn.Module, images: torch.Tensor | None, metadata: torch.Tensor,
                    device: torch.device | str = "cpu", batch_size: int = 32) -> np.ndarray:
    """Probabilities for prepared inputs (normalised images, encoded metadata), in batches.

    ``images`` may be None for a model that does not look at the photo: a 1-pixel placeholder is
    passed, as :class:`~skinml.data.dataset.LesionDataset` does. The result does not depend on
    ``batch_size`` (eval mode: no batch statistics).
    """
    device = pick_device(device)
    if any(m.training for m in model.modules()):  # eval() costs ~1 ms (it sets every module); reading is cheaper
        model.eval()
    out = []
    for start in range(0, len(metadata), batch_size):
        chunk = metadata[start:start + batch_size]
        image = images[start:start + batch_size] if images is not None else torch.zeros(len(chunk), 3, 1, 1)
        out.append(_forward_proba(model, image, chunk, device)[1].cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(schema.LABELS)))


def decode_images(bundle: InferenceBundle, frame: pd.DataFrame) -> np.ndarray | None:
    """The evaluation view of ``frame``'s photos (uint8, cached), or None for metadata-only models."""
    if not bundle.uses_images:
        return None
    return build_split_arrays(frame, bundle.preprocessor, bundle.image_config.decode_size).images


def score_frame(bundle: InferenceBundle, frame: pd.DataFrame, device: torch.device | str | None = None,
                batch_size: int = 64, images: np.ndarray | None = None) -> np.ndarray:
    """Class probabilities for each row of ``frame`` (metadata.csv columns + ``image_path``)."""
    device = pick_device(device or "cpu")
    if images is None:
        images = decode_images(bundle, frame)
    labels = frame[schema.TARGET].map(schema.LABEL_TO_INDEX).fillna(0).to_numpy(dtype=np.int64) \
        if schema.TARGET in frame else np.zeros(len(frame), dtype=np.int64)
    dataset = LesionDataset(images if bundle.uses_images else None, bundle.preprocessor.transform(frame), labels,
                            build_eval_transform(bundle.image_config) if bundle.uses_images else None)
    bundle.model.to(device)
    proba, _ = predict_proba(bundle.model, DataLoader(dataset, batch_size=batch_size, shuffle=False), device)
    return proba
