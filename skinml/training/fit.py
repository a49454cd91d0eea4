"""The epoch loop: train, validate, select by validation loss, stop early; no MLflow in here.

:func:`fit` calls ``on_epoch_end`` after every epoch; the training step uses it to log the
curves and write the checkpoints, tests use it to watch. The optimiser and scheduler are built
here from the recipe so that every caller trains the same way.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from skinml.data import schema
from skinml.inference import predict_proba
from skinml.training.ema import WeightAverage
from skinml.training.loop import epoch_metrics, progress, train_one_epoch
from skinml.training.recipe import Recipe
from skinml.training.state import TrainState

log = logging.getLogger(__name__)


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    groups = model.param_groups()
    param_groups = [
        {"params": params, "lr": lr, "name": name}
        for name, params, lr in (("backbone", groups["backbone"], recipe.lr_backbone), ("head", groups["head"], recipe.lr_head))
        if params
    ]
    cls = torch.optim.AdamW if recipe.optimizer == "adamw" else torch.optim.Adam
    return cls(param_groups, weight_decay=recipe.weight_decay)


def build_scheduler(optimizer, recipe: Recipe):
    if recipe.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.epochs, eta_min=recipe.eta_min)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _epoch: 1.0)


@dataclass
class EpochEnd:
    """What ``on_epoch_end`` sees: the finished epoch's curve row (without ``epoch``) and
    validation probabilities, whether it is the new selected epoch, and the state after it."""

    epoch: int
    row: dict[str, float]
    val_proba: np.ndarray
    improved: bool
    state: TrainState


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (``ru_maxrss``), in MiB: what ``/usr/bin/time -v``
    reports at the end, not a sample, so the transient peak of a backward pass is counted."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def fit(model: nn.Module, train_loader, val_loader, val_labels: np.ndarray, criterion, optimizer, scheduler,
        device: torch.device, recipe: Recipe, state: TrainState,
        on_epoch_end: Callable[[EpochEnd], None] | None = None, max_epochs: int | None = None,
        before_epoch: Callable[[int], None] | None = None, batch_transform=None,
        metadata_transform=None, train_row_transform: Callable[[dict], dict] | None = None,
        average: WeightAverage | None = None, mix=None) -> TrainState:
    """Train from ``state.epoch + 1`` to ``recipe.epochs`` (at most ``max_epochs`` more).

    ``before_epoch(epoch)`` seeds the epoch's data order (:meth:`Loaders.set_epoch`);
    ``batch_transform`` augments each batch on the device (:meth:`Loaders.augment`);
    ``average`` (``ema_decay`` > 0) is updated after every step of the unwrapped ``model`` and
    is what validation scores; ``mix`` blends each training batch (mixup, :meth:`Loaders.mix`).
    """
    inner = getattr(model, "module", model)  # DistributedDataParallel
    after_step = (lambda: average.update(inner)) if average is not None else None
    scored = average.module if average is not None else model
    start_epoch = state.epoch + 1
    for epoch in range(start_epoch, recipe.epochs + 1):
        if max_epochs is not None and epoch - start_epoch >= max_epochs:
            break
        if before_epoch is not None:
            before_epoch(epoch)
        lrs = {f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups}
        tick = time.perf_counter()
        row = train_one_epoch(model, train_loader, criterion, optimizer, device, recipe.grad_clip,
                              desc=f"epoch {epoch}/{recipe.epochs}", batch_transform=batch_transform,
                              metadata_transform=metadata_transform, after_step=after_step, mix=mix)
        if train_row_transform is not None:  # e.g. the mean over torchrun processes
            row = train_row_transform(row)
        proba, val_loss = predict_proba(scored, val_loader, device, criterion, progress=progress("val"))
        scheduler.step()
        row.update(val_loss=val_loss, **epoch_metrics(val_labels, proba, schema.LABELS), **lrs)
        row["epoch_seconds"] = time.perf_counter() - tick
        row["peak_rss_mb"] = peak_rss_mb()

        improved = state.improved(val_loss)
        state.epoch = epoch
        state.history.append({**row, "epoch": epoch})
        if improved:
            state.best = {"epoch": epoch, "val_loss": val_loss, "val_balanced_accuracy": row["val_balanced_accuracy"],
                          "val_accuracy": row["val_accuracy"]}
            state.epochs_without_improvement = 0
        else:
            state.epochs_without_improvement += 1
        log.info("epoch %d/%d train_loss %.4f val_loss %.4f val_bacc %.3f (%.1fs)%s", epoch, recipe.epochs,
                 row["train_loss"], val_loss, row["val_balanced_accuracy"], row["epoch_seconds"],
                 " *" if improved else "")
        patience = recipe.early_stopping_patience
        state.stopped_early = bool(patience) and state.epochs_without_improvement >= patience
        if on_epoch_end is not None:
            on_epoch_end(EpochEnd(epoch, row, proba, improved, state))
        if state.stopped_early:
            print(f"Early stopping after epoch {epoch}: no lower validation loss for {patience} epochs.")
            break
    return state
