"""A tracked training run: split -> preprocess -> train -> select by validation loss -> checkpoints.

Everything a later step needs is on the run: the resolved recipe, the split it used (run id
and manifest hash), per-epoch curves, the selected epoch's summaries and confusion matrix, and
the ``best`` (selected) and ``last`` (resumable) checkpoints.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import psutil
import torch
from torch.utils.data import DataLoader

from skinml import tracking
from skinml.data import schema
from skinml.data.preprocess import MetadataPreprocessor
from skinml.data.source import load_metadata
from skinml.data.split import attach_split
from skinml.data.transforms import ImageConfig, build_eval_transform, build_train_transform
from skinml.pipeline import SplitRef, load_split, log_dataset_inputs, run_split
from skinml.training import checkpoints
from skinml.training.data import LesionDataset, build_split_arrays, default_num_workers
from skinml.training.imbalance import class_counts, inverse_frequency_weights, make_loss, make_sampler
from skinml.training.loop import epoch_metrics, predict, train_one_epoch
from skinml.training.recipe import Recipe

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_options(recipe: Recipe) -> dict[str, Any]:
    """Recipe -> create_model options (image models get the backbone and its weights)."""
    options = dict(recipe.model_options)
    backbone_option = {"cnn_fusion": "backbone", "image_only": "backbone", "spatial_fusion": "cnn_backbone"}
    if recipe.model in backbone_option:
        if recipe.backbone:
            options.setdefault(backbone_option[recipe.model], recipe.backbone)
        options.setdefault("pretrained", recipe.pretrained)
    return options


def build_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
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
class TrainResult:
    run_id: str
    best_epoch: int
    best_val_loss: float
    best_val_bacc: float
    epochs_run: int
    history: list[dict[str, float]]


def _rng_state(sampler_generator: torch.Generator, loader_generator: torch.Generator) -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "sampler": sampler_generator.get_state(),
        "loader": loader_generator.get_state(),
    }


def _restore_rng(state: dict[str, Any], sampler_generator: torch.Generator, loader_generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    sampler_generator.set_state(state["sampler"])
    loader_generator.set_state(state["loader"])


def _resolve_split(split: str | None, data_dir: str | None) -> SplitRef:
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
) -> TrainResult:
    """Train ``recipe`` on a split (run id or manifest path; made with defaults when None).

    ``resume`` names a run whose ``last`` checkpoint is continued with the same optimiser,
    scheduler and sampler state. ``max_epochs_this_call`` stops early without marking the run
    finished-early (used to simulate interruptions in tests).
    """
    dev = pick_device(device)
    resume_state = None
    if resume:
        resume_state = checkpoints.load(tracking.download_artifact(resume, checkpoints.LAST))
        recipe = Recipe.from_dict(resume_state["recipe"])
        split = resume_state["split_run_id"] or resume_state["split_source"]
        seed = resume_state["seed"]
    split_ref = _resolve_split(split, data_dir)

    seed_everything(seed)
    frame = attach_split(load_metadata(data_dir), split_ref.manifest)
    parts = {name: frame[frame["split"] == name] for name in ("train", "val")}
    preprocessor = MetadataPreprocessor(recipe.include_biopsed, recipe.missing_indicators, recipe.metadata_encoding)
    preprocessor.fit(parts["train"])

    from skinml.models import create_model

    model = create_model(recipe.model, preprocessor.n_features_out, **model_options(recipe))
    uses_images = recipe.model != "metadata_only"
    image_config = None
    if uses_images:
        data_config = model.data_config
        image_config = ImageConfig(image_size=recipe.image_size, mean=tuple(data_config["mean"]), std=tuple(data_config["std"]))
    train_size = (recipe.augment.resize or recipe.image_size) if uses_images else None
    train_arrays = build_split_arrays(parts["train"], preprocessor, train_size, cache=cache_images)
    val_arrays = build_split_arrays(parts["val"], preprocessor, recipe.image_size if uses_images else None, cache=cache_images)

    train_tf = build_train_transform(image_config, recipe.augment) if uses_images else None
    eval_tf = build_eval_transform(image_config) if uses_images else None
    sampler_gen = torch.Generator().manual_seed(seed)
    loader_gen = torch.Generator().manual_seed(seed + 1)
    workers = default_num_workers(dev) if num_workers is None else num_workers
    workers = workers if uses_images else 0
    pin = dev.type == "cuda"
    use_sampler = recipe.imbalance in ("sampler", "both")
    train_loader = DataLoader(
        LesionDataset(train_arrays.images, train_arrays.metadata, train_arrays.labels, train_tf),
        batch_size=recipe.batch_size,
        sampler=make_sampler(train_arrays.labels, sampler_gen) if use_sampler else None,
        shuffle=not use_sampler,
        generator=loader_gen,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=workers > 0,
        drop_last=len(train_arrays.labels) > recipe.batch_size,  # BatchNorm needs >1 row per batch
    )
    val_loader = DataLoader(
        LesionDataset(val_arrays.images, val_arrays.metadata, val_arrays.labels, eval_tf),
        batch_size=max(64, recipe.batch_size), shuffle=False, num_workers=0, pin_memory=pin,
    )

    model.to(dev)
    if uses_images:
        model.to(memory_format=torch.channels_last)
    criterion = make_loss(train_arrays.labels, recipe.imbalance, recipe.label_smoothing).to(dev)
    optimizer = build_optimizer(model, recipe)
    scheduler = build_scheduler(optimizer, recipe)
    history: list[dict[str, float]] = []
    best = {"epoch": 0, "val_loss": float("inf"), "val_balanced_accuracy": float("nan")}
    start_epoch = 1
    if resume_state is not None:
        model.load_state_dict(resume_state["model_state"])
        optimizer.load_state_dict(resume_state["optimizer_state"])
        scheduler.load_state_dict(resume_state["scheduler_state"])
        _restore_rng(resume_state["rng"], sampler_gen, loader_gen)
        history, best = resume_state["history"], resume_state["best"]
        start_epoch = resume_state["epoch"] + 1

    family = getattr(model, "family", "fusion" if "fusion" in recipe.model else "baseline")
    tags = {
        tracking.TAG_MODEL: recipe.model,
        tracking.TAG_FAMILY: family,
        tracking.TAG_RECIPE: recipe.preset,
        tracking.TAG_SPLIT_HASH: split_ref.sha256,
        tracking.TAG_SPLIT_RUN: split_ref.run_id or "",
        "skinml.device": str(dev) if dev.type == "cpu" else f"cuda:{torch.cuda.get_device_name(dev)}",
    }
    if resume:
        tags["skinml.resumed_from"] = resume
    tags.update(extra_tags or {})
    # Continue the interrupted run itself, unless `mlflow run` or a pipeline made a run for us.
    reopen = resume if (resume and not os.environ.get("MLFLOW_RUN_ID") and mlflow.active_run() is None) else None
    process = psutil.Process()
    peak_rss = process.memory_info().rss
    with _training_run(reopen, run_name or f"{recipe.model}-{recipe.preset}-s{seed}", tags, experiment) as run:
        run_id = run.info.run_id
        if reopen is None:
            _log_run_inputs(recipe, seed, split_ref, frame, model, preprocessor, train_arrays.labels, dev, workers)
            for row in history:  # a resumed run in a new run id carries the earlier curves too
                mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
        with tempfile.TemporaryDirectory() as tmp:
            epochs_without_improvement = sum(1 for row in history if row["epoch"] > best["epoch"])
            last_epoch = start_epoch - 1
            for epoch in range(start_epoch, recipe.epochs + 1):
                if max_epochs_this_call is not None and epoch - start_epoch >= max_epochs_this_call:
                    break
                lrs = {f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups}
                tick = time.perf_counter()
                row = train_one_epoch(model, train_loader, criterion, optimizer, dev, recipe.grad_clip,
                                      desc=f"epoch {epoch}/{recipe.epochs}")
                proba, val_loss = predict(model, val_loader, dev, criterion, desc="val")
                scheduler.step()
                row.update(val_loss=val_loss, **epoch_metrics(val_arrays.labels, proba, schema.LABELS), **lrs)
                row["epoch_seconds"] = time.perf_counter() - tick
                peak_rss = max(peak_rss, process.memory_info().rss)
                row["peak_rss_mb"] = peak_rss / 2**20
                mlflow.log_metrics(row, step=epoch)
                row["epoch"] = epoch
                history.append(row)
                last_epoch = epoch
                improved = val_loss < best["val_loss"]
                if improved:
                    best = {"epoch": epoch, "val_loss": val_loss, "val_balanced_accuracy": row["val_balanced_accuracy"],
                            "val_accuracy": row["val_accuracy"], "proba": proba}
                    epochs_without_improvement = 0
                    state = checkpoints.inference_state(model, preprocessor, image_config)
                    state.update(epoch=epoch, recipe=recipe.to_dict(), seed=seed, val_loss=val_loss)
                    mlflow.log_artifact(str(checkpoints.save(state, Path(tmp, "best.pt"))), "checkpoints")
                else:
                    epochs_without_improvement += 1
                log.info("epoch %d/%d train_loss %.4f val_loss %.4f val_bacc %.3f (%.1fs)%s", epoch, recipe.epochs,
                         row["train_loss"], val_loss, row["val_balanced_accuracy"], row["epoch_seconds"],
                         " *" if improved else "")
                last = checkpoints.inference_state(model, preprocessor, image_config)
                last.update(
                    epoch=epoch, recipe=recipe.to_dict(), seed=seed, optimizer_state=optimizer.state_dict(),
                    scheduler_state=scheduler.state_dict(), rng=_rng_state(sampler_gen, loader_gen),
                    history=history, best={k: v for k, v in best.items() if k != "proba"},
                    split_run_id=split_ref.run_id, split_source=split_ref.source,
                )
                mlflow.log_artifact(str(checkpoints.save(last, Path(tmp, "last.pt"))), "checkpoints")
                if recipe.early_stopping_patience and epochs_without_improvement >= recipe.early_stopping_patience:
                    print(f"Early stopping after epoch {epoch}: no lower validation loss for "
                          f"{recipe.early_stopping_patience} epochs.")
                    mlflow.set_tag("skinml.early_stopped_at", str(epoch))
                    break
            _log_selected_epoch(best, val_arrays.labels, history, last_epoch)
    return TrainResult(run_id, int(best["epoch"]), float(best["val_loss"]), float(best["val_balanced_accuracy"]),
                       last_epoch, history)


def _training_run(reopen: str | None, run_name: str, tags: dict[str, str], experiment: str | None):
    if reopen:
        tracking.setup_tracking()
        run = mlflow.start_run(run_id=reopen)
        mlflow.set_tags(tags)
        return run
    return tracking.start_run("train", experiment=experiment, run_name=run_name, tags=tags,
                              log_system_metrics=True)


def _log_run_inputs(recipe, seed, split_ref, frame, model, preprocessor, train_labels, device, workers) -> None:
    params = {f"recipe.{k}": v for k, v in recipe.flat().items()}
    params.update(
        model=recipe.model,
        seed=seed,
        backbone=getattr(model, "backbone_name", "none"),
        weights_source=getattr(model, "weights_source", "unknown"),
        split_run_id=split_ref.run_id or "",
        split_source=split_ref.source,
        split_manifest_sha256=split_ref.sha256,
        data_dir=frame.attrs.get("data_dir"),
        n_metadata_features=preprocessor.n_features_out,
        device=str(device),
        num_workers=workers,
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


def _log_selected_epoch(best: dict[str, Any], val_labels: np.ndarray, history, last_epoch: int) -> None:
    if not best.get("epoch"):
        return
    mlflow.log_metrics({
        "best_val_loss": best["val_loss"],
        "best_val_bacc": best["val_balanced_accuracy"],
        "best_val_accuracy": best["val_accuracy"],
        "best_epoch": best["epoch"],
        "epochs_run": last_epoch,
    })
    if "proba" not in best:  # resumed after the best epoch: its figure is already logged
        return
    from skinml.evaluation.metrics import compute_metrics
    from skinml.evaluation.plots import plot_confusion_matrix, save_figure

    metrics = compute_metrics(val_labels, best["proba"])
    tracking.log_json({"epoch": best["epoch"], "labels": list(schema.LABELS),
                       "confusion_matrix": metrics["confusion_matrix"]}, "validation/confusion_matrix.json")
    with tempfile.TemporaryDirectory() as tmp:
        fig = plot_confusion_matrix(metrics["confusion_matrix"], list(schema.LABELS), normalized=False,
                                    title=f"Validation confusion matrix (epoch {best['epoch']})")
        path = Path(tmp, "confusion_matrix.png")
        save_figure(fig, path)
        mlflow.log_artifact(str(path), "validation")
