"""The ``train`` step: split -> data -> model -> fit, as one tracked MLflow run.

Everything a later step needs is on the run: the resolved recipe, the split it used (run id
and manifest hash), per-epoch curves, the selected epoch's summaries and validation confusion
matrix, and the ``best`` (selected, for scoring) and ``last`` (resumable) checkpoints.
The work itself is library code (:mod:`skinml.training`); this module owns the run.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch

from skinml import inference, tracking
from skinml.data import schema
from skinml.data.transforms import ImageConfig
from skinml.inference import pick_device
from skinml.steps.split import SplitRef, load_split, log_dataset_inputs, run_split
from skinml.training import distributed
from skinml.training.ema import WeightAverage
from skinml.training.fit import EpochEnd, build_optimizer, build_scheduler, fit
from skinml.training.imbalance import class_counts, inverse_frequency_weights
from skinml.training.prepare import (
    Loaders,
    TrainingData,
    build_criterion,
    build_loaders,
    build_model,
    prepare_data,
    validate_recipe,
)
from skinml.training.recipe import Recipe
from skinml.training.state import TrainState, capture_rng, restore_rng, seed_everything

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_id: str
    best_epoch: int
    best_val_loss: float
    best_val_bacc: float
    epochs_run: int
    history: list[dict[str, float]]


def resolve_split(split: str | None, data_dir: str | None) -> SplitRef:
    if split:
        return load_split(split)
    print("No split given: making one with the defaults (stratified by patient, seed 42).")
    # Its own run that others can reuse, not the run `mlflow run` made for training.
    with tracking.outside_env_run():
        return run_split(data_dir)


def train(
    recipe: Recipe,
    split: str | None = None,
    data_dir: str | None = None,
    seed: int = 42,
    resume: str | None = None,
    experiment: str | None = None,
    device: str = "auto",
    num_workers: int | None = None,
    cache_images: bool = True,
    run_name: str | None = None,
    max_epochs_this_call: int | None = None,
    extra_tags: dict[str, str] | None = None,
    epoch_callback: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``recipe`` on a split (run id or manifest path; made with defaults when None).

    ``resume`` names a run whose ``last`` checkpoint is continued with the same optimiser,
    scheduler and sampler state. ``max_epochs_this_call`` stops early without marking the run
    finished-early (used to simulate interruptions in tests). ``epoch_callback(epoch, row)`` runs
    after each epoch is logged and checkpointed (the sweep's pruner; an exception it raises ends
    the run as FAILED, with everything up to that epoch kept).
    """
    dist_info = distributed.from_env()
    dev = distributed.setup(dist_info, device) if dist_info.enabled else pick_device(device)
    try:
        return _train(recipe, split, data_dir, seed, resume, experiment, dev, num_workers, cache_images, run_name,
                      max_epochs_this_call, extra_tags, epoch_callback, dist_info)
    finally:
        if dist_info.enabled:
            distributed.teardown()


def _train(recipe, split, data_dir, seed, resume, experiment, dev, num_workers, cache_images, run_name,
           max_epochs_this_call, extra_tags, epoch_callback, dist_info) -> TrainResult:
    resume_state = None
    if resume:
        resume_state = inference.load_checkpoint(tracking.download_artifact(resume, inference.LAST))
        recipe = Recipe.from_dict(resume_state["recipe"])
        split = resume_state["split_run_id"] or resume_state["split_source"]
        seed = resume_state["seed"]
    validate_recipe(recipe)
    if dist_info.enabled:
        distributed.per_rank_batch(recipe.batch_size, dist_info)  # fail before any run is made
    # Only rank 0 may make a split run; the others load the one it made.
    split_ref = resolve_split(split, data_dir) if dist_info.is_main else None
    chosen = distributed.broadcast(split_ref.run_id or split_ref.source if split_ref else None, dist_info)
    if split_ref is None:
        split_ref = load_split(chosen)

    seed_everything(seed)
    data = prepare_data(recipe, split_ref.manifest, data_dir, split_ref.drop_missing_images)
    model, image_config = build_model(recipe, data.preprocessor)
    loaders = build_loaders(recipe, data, image_config, dev, seed, num_workers, cache_images, dist_info)
    model.to(dev)
    if model.uses_images:
        model.to(memory_format=torch.channels_last)
    trained = model  # what fit() steps: DDP around the model under torchrun
    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        if dev.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        trained = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    criterion = build_criterion(recipe, loaders, dev)
    optimizer = build_optimizer(model, recipe)
    scheduler = build_scheduler(optimizer, recipe)
    average = WeightAverage(model, recipe.ema_decay) if recipe.ema_decay > 0 else None
    state = TrainState()
    if resume_state is not None:
        model.load_state_dict(resume_state["model_state"])
        if average is not None:
            average.load_state_dict(resume_state["weight_average"])
        optimizer.load_state_dict(resume_state["optimizer_state"])
        scheduler.load_state_dict(resume_state["scheduler_state"])
        restore_rng(resume_state["rng"], loaders.sampler_generator, loaders.loader_generator)
        state = TrainState.from_dict(resume_state["train_state"])

    fit_options = dict(
        max_epochs=max_epochs_this_call, before_epoch=loaders.set_epoch,
        batch_transform=loaders.augment if loaders.batch_augment is not None else None,
        metadata_transform=loaders.mask_metadata if loaders.field_dropout is not None else None,
        mix=loaders.mix if loaders.mixup is not None else None,
        train_row_transform=distributed.global_train_row(dist_info, dev) if dist_info.enabled else None,
        average=average)
    if not dist_info.is_main:  # the other torchrun processes train in step, rank 0 logs
        state = fit(trained, loaders.train, loaders.val, loaders.val_arrays.labels, criterion, optimizer, scheduler,
                    dev, recipe, state, **fit_options)
        return TrainResult("", int(state.best.get("epoch", 0)), float(state.best.get("val_loss", np.nan)),
                           float(state.best.get("val_balanced_accuracy", np.nan)), state.epoch, state.history)

    tags = {
        tracking.TAG_MODEL: recipe.model,
        tracking.TAG_FAMILY: model.family,
        tracking.TAG_RECIPE: recipe.preset,
        tracking.TAG_SPLIT_HASH: split_ref.sha256,
        tracking.TAG_SPLIT_RUN: split_ref.run_id or "",
        tracking.TAG_RECIPE_OVERRIDES: ",".join(recipe_overrides(recipe)),
        "skinml.device": str(dev) if dev.type == "cpu" else f"cuda:{torch.cuda.get_device_name(dev)}",
    }
    tags.update(tracking.host_tags())
    if resume:
        tags["skinml.resumed_from"] = resume
    tags.update(extra_tags or {})
    # Continue the interrupted run itself, unless `mlflow run` or a pipeline made a run for us.
    reopen = resume if (resume and not os.environ.get("MLFLOW_RUN_ID") and mlflow.active_run() is None) else None
    with _training_run(reopen, run_name or f"{recipe.model}-{recipe.preset}-s{seed}", tags, experiment) as run:
        run_id = run.info.run_id
        if reopen is None:
            _log_run_inputs(recipe, seed, split_ref, data, model, loaders, dev)
            if dist_info.enabled:
                import torch.distributed as dist

                tracking.log_params({"world_size": dist_info.world_size, "global_batch_size": recipe.batch_size,
                                     "per_process_batch_size": recipe.batch_size // dist_info.world_size,
                                     "dist_backend": dist.get_backend()})
        if resume and reopen is None:
            _carry_over(resume, state)
        with tempfile.TemporaryDirectory() as tmp:
            hook = _EpochLogger(Path(tmp), model, data, image_config, recipe, seed, split_ref, optimizer, scheduler,
                                loaders, epoch_callback, average)
            state = fit(trained, loaders.train, loaders.val, loaders.val_arrays.labels, criterion, optimizer, scheduler,
                        dev, recipe, state, on_epoch_end=hook, **fit_options)
            if state.stopped_early:
                mlflow.set_tag("skinml.early_stopped_at", str(state.epoch))
            _log_selected_epoch(state, hook.best_proba, loaders.val_arrays.labels)
    return TrainResult(run_id, int(state.best["epoch"]), float(state.best["val_loss"]),
                       float(state.best["val_balanced_accuracy"]), state.epoch, state.history)


def recipe_overrides(recipe: Recipe) -> list[str]:
    """Fields of ``recipe`` that differ from its preset, other than the model and its backbone."""
    from skinml.training.recipe import resolve_recipe

    preset = resolve_recipe(recipe.preset, model=recipe.model).flat()
    ignored = {"model", "backbone", "pretrained", "model_options", "preset", "augment_device",
               "grad_checkpointing"}
    return sorted(k for k, v in recipe.flat().items() if k not in ignored and preset.get(k) != v)


def _carry_over(source_run: str, state: TrainState) -> None:
    """Resumed into a new run (``mlflow run`` made one): bring the earlier epochs with it.

    The curves, and the selected epoch's checkpoint and validation figures when that epoch came
    before the interruption, so evaluate and register work on the new run alone.
    """
    for row in state.history:
        mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
    client = mlflow.MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        for folder in ("checkpoints", "validation"):
            for item in client.list_artifacts(source_run, folder):
                if item.path == inference.LAST:
                    continue  # this run writes its own after the next epoch
                local = tracking.download_artifact(source_run, item.path, Path(tmp) / folder)
                mlflow.log_artifact(str(local), folder)
    mlflow.set_tag("skinml.carried_over_from", source_run)


class _EpochLogger:
    """After each epoch: the curve row to MLflow, ``best.pt`` on improvement, ``last.pt`` always."""

    def __init__(self, tmp: Path, model, data: TrainingData, image_config: ImageConfig | None, recipe: Recipe,
                 seed: int, split_ref: SplitRef, optimizer, scheduler, loaders: Loaders,
                 callback: Callable[[int, dict[str, float]], None] | None = None,
                 average: WeightAverage | None = None) -> None:
        self.tmp, self.model, self.data, self.image_config = tmp, model, data, image_config
        self.average = average
        self.recipe, self.seed, self.split_ref = recipe, seed, split_ref
        self.optimizer, self.scheduler, self.loaders = optimizer, scheduler, loaders
        self.best_proba: np.ndarray | None = None
        self.callback = callback

    def _state(self, model) -> dict[str, Any]:
        state = inference.inference_state(model, self.data.preprocessor, self.image_config)
        state.update(recipe=self.recipe.to_dict(), seed=self.seed)
        return state

    def __call__(self, end: EpochEnd) -> None:
        mlflow.log_metrics(end.row, step=end.epoch)
        if end.improved:
            self.best_proba = end.val_proba
            # What validation scored (the weight average when there is one) is what best.pt serves.
            best = self._state(self.average.module if self.average is not None else self.model)
            best.update(epoch=end.epoch, val_loss=end.row["val_loss"])
            mlflow.log_artifact(str(inference.save_checkpoint(best, self.tmp / "best.pt")), "checkpoints")
        last = self._state(self.model)  # the raw weights: what training resumes from
        last.update(
            epoch=end.epoch, optimizer_state=self.optimizer.state_dict(), scheduler_state=self.scheduler.state_dict(),
            rng=capture_rng(self.loaders.sampler_generator, self.loaders.loader_generator),
            train_state=end.state.to_dict(), split_run_id=self.split_ref.run_id, split_source=self.split_ref.source,
        )
        if self.average is not None:
            last["weight_average"] = self.average.state_dict()
        mlflow.log_artifact(str(inference.save_checkpoint(last, self.tmp / "last.pt")), "checkpoints")
        if self.callback is not None:
            self.callback(end.epoch, dict(end.row))


def _training_run(reopen: str | None, run_name: str, tags: dict[str, str], experiment: str | None):
    if reopen:
        tracking.setup_tracking()
        run = mlflow.start_run(run_id=reopen)
        mlflow.set_tags(tags)
        return run
    return tracking.start_run("train", experiment=experiment, run_name=run_name, tags=tags,
                              log_system_metrics=True)


def training_params(recipe: Recipe, seed: int, split_hash: str, data_dir: str, device: torch.device | str) -> dict[str, Any]:
    """The inputs that decide a training's result, as logged: what reuse compares."""
    params: dict[str, Any] = {f"recipe.{k}": v for k, v in recipe.flat().items()}
    params.update(model=recipe.model, seed=seed, split_manifest_sha256=split_hash, data_dir=data_dir,
                  device=str(device))
    return params


def _log_run_inputs(recipe: Recipe, seed: int, split_ref: SplitRef, data: TrainingData, model, loaders: Loaders,
                    device: torch.device) -> None:
    frame, preprocessor, train_labels = data.frame, data.preprocessor, loaders.train_arrays.labels
    params = training_params(recipe, seed, split_ref.sha256, frame.attrs.get("data_dir"), device)
    params.update(
        backbone=model.backbone_name,
        weights_source=model.weights_source,
        split_run_id=split_ref.run_id or "",
        split_source=split_ref.source,
        n_metadata_features=preprocessor.n_features_out,
        num_workers=loaders.num_workers,
        torch_version=torch.__version__,
    )
    tracking.log_params(params)
    tracking.log_json(recipe.to_dict(), "recipe.json")
    tracking.log_json(preprocessor.to_dict(), "preprocessor.json")
    tracking.log_json(list(schema.LABELS), "labels.json")
    tracking.log_json(model.config, "model_config.json")
    counts = class_counts(train_labels)
    tracking.log_json(
        {"train_class_counts": dict(zip(schema.LABELS, counts.tolist())),
         "inverse_frequency_weights": dict(zip(schema.LABELS, inverse_frequency_weights(train_labels).tolist()))},
        "class_balance.json",
    )
    log_dataset_inputs(frame, frame.attrs.get("data_dir", ""), split_names=("train", "val"))


def _log_selected_epoch(state: TrainState, best_proba: np.ndarray | None, val_labels: np.ndarray) -> None:
    best = state.best
    if not best.get("epoch"):
        return
    mlflow.log_metrics({
        "best_val_loss": best["val_loss"],
        "best_val_bacc": best["val_balanced_accuracy"],
        "best_val_accuracy": best["val_accuracy"],
        "best_epoch": best["epoch"],
        "epochs_run": state.epoch,
    })
    if best_proba is None:  # resumed after the best epoch: its figure is already logged
        return
    from skinml.evaluation.metrics import compute_metrics
    from skinml.evaluation.plots import plot_confusion_matrix, save_figure

    metrics = compute_metrics(val_labels, best_proba)
    tracking.log_json({"epoch": best["epoch"], "labels": list(schema.LABELS),
                       "confusion_matrix": metrics["confusion_matrix"]}, "validation/confusion_matrix.json")
    with tempfile.TemporaryDirectory() as tmp:
        fig = plot_confusion_matrix(metrics["confusion_matrix"], list(schema.LABELS), normalized=False,
                                    title=f"Validation confusion matrix (epoch {best['epoch']})")
        path = Path(tmp, "confusion_matrix.png")
        save_figure(fig, path)
        mlflow.log_artifact(str(path), "validation")
