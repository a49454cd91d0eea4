"""One epoch of training, and scoring a loader, each a screen long (torchvision reference style)."""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from skinml.inference import autocast, to_device
from skinml.training.mixup import Mixup


def _progress(loader, desc: str):
    # A bar for people at a terminal; nothing in CI logs or `mlflow run` output files.
    return tqdm(loader, desc=desc, leave=False, disable=not sys.stderr.isatty(), dynamic_ncols=True)


def train_one_epoch(model: nn.Module, loader, criterion, optimizer, device: torch.device,
                    grad_clip: float = 0.0, desc: str = "train", batch_transform=None,
                    metadata_transform=None, after_step=None, mix=None) -> dict[str, float]:
    """One pass over ``loader``; ``batch_transform`` augments each image batch once it is on the
    device, ``metadata_transform`` masks metadata (questionnaire dropout), ``mix(image, metadata,
    target)`` blends the batch (mixup: a :class:`~skinml.training.mixup.MixedBatch`, and the loss
    blended with it), ``after_step()`` runs after each optimiser step (the weight average)."""
    model.train()
    # Recomputed activations run BatchNorm forward a second time in backward(); keep the
    # statistics of the real forward pass (a checkpointed run then equals a plain one).
    running_stats = batchnorm_statistics(model) if _recomputes_forward(model) else []
    total_loss, seen = 0.0, 0
    start = time.perf_counter()
    for image, metadata, target in _progress(loader, desc):
        if metadata_transform is not None:
            metadata = metadata_transform(metadata)
        image, metadata = to_device(image, metadata, device)
        if batch_transform is not None:
            image = batch_transform(image).contiguous(memory_format=torch.channels_last)
        target = target.to(device, non_blocking=device.type == "cuda")
        mixed = mix(image, metadata, target) if mix is not None else None
        if mixed is not None:
            image, metadata = mixed.image, mixed.metadata
        with autocast(device):
            logits = model(image, metadata)
        loss = criterion(logits.float(), target) if mixed is None else Mixup.loss(criterion, logits.float(), target, mixed)
        optimizer.zero_grad(set_to_none=True)
        kept = [t.clone() for t in running_stats]
        loss.backward()
        for tensor, value in zip(running_stats, kept):
            tensor.copy_(value)
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if after_step is not None:
            after_step()
        total_loss += loss.item() * len(target)
        seen += len(target)
    seconds = time.perf_counter() - start
    return {"train_loss": total_loss / max(seen, 1), "train_seconds": seconds, "images_per_second": seen / seconds}


def _recomputes_forward(model: nn.Module) -> bool:
    inner = getattr(model, "module", model)  # DistributedDataParallel
    return bool(getattr(inner, "grad_checkpointing", False))


def batchnorm_statistics(model: nn.Module) -> list[torch.Tensor]:
    """The running mean, variance and batch count of every BatchNorm layer (in place)."""
    out = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            out += [t for t in (module.running_mean, module.running_var, module.num_batches_tracked) if t is not None]
    return out


def epoch_metrics(labels: np.ndarray, proba: np.ndarray, label_names) -> dict[str, float]:
    """Accuracy, balanced accuracy (over classes present) and per-class recall, for curves."""
    predicted = proba.argmax(axis=1)
    k = len(label_names)
    cm = np.bincount(labels * k + predicted, minlength=k * k).reshape(k, k)
    support = cm.sum(axis=1)
    recall = np.divide(np.diag(cm), support, out=np.zeros(k), where=support > 0)
    out = {
        "val_accuracy": float(np.trace(cm) / max(cm.sum(), 1)),
        "val_balanced_accuracy": float(recall[support > 0].mean()) if (support > 0).any() else float("nan"),
    }
    out.update({f"val_recall_{name}": float(recall[i]) for i, name in enumerate(label_names) if support[i] > 0})
    return out


def progress(desc: str):
    """A tqdm wrapper for :func:`skinml.inference.predict_proba`."""
    return lambda loader: _progress(loader, desc)
