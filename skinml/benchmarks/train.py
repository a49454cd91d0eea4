"""How much of the hardware the training pipeline uses: model-bound vs end-to-end images/s.

In one process and on one device, with the recipe's model, batch size and precision:

- **model-bound**: forward + backward + optimiser step on a batch of synthetic tensors already on
  the device (no data pipeline at all), the ceiling the pipeline could reach;
- **end-to-end**: the real training pipeline (decode cache, loaders, augmentation per the
  recipe's ``augment_device``, transfer, the same step) on the real split.

Their ratio says whether training is model-bound (close to 1) or data-bound. Used by
``skinml benchmark-train``, which also logs the figures to MLflow.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from skinml.inference import autocast, pick_device
from skinml.training.fit import build_optimizer
from skinml.training.loop import train_one_epoch
from skinml.training.prepare import build_criterion, build_loaders, build_model, prepare_data
from skinml.training.recipe import Recipe
from skinml.training.state import seed_everything


@dataclass
class TrainBenchmark:
    device: str
    batch_size: int
    image_size: int
    augment_device: str
    num_workers: int
    model_bound_images_per_second: float
    end_to_end_images_per_second: float
    model_bound_steps: int
    end_to_end_images: int

    @property
    def ratio(self) -> float:
        return self.end_to_end_images_per_second / self.model_bound_images_per_second

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_bound_rate(model, recipe: Recipe, n_features: int, device: torch.device, steps: int = 10,
                     warmup: int = 2) -> float:
    """Images/s of training steps on synthetic tensors already on ``device``."""
    model.train()
    optimizer = build_optimizer(model, recipe)
    criterion = torch.nn.CrossEntropyLoss()
    size = recipe.image_size
    image = torch.randn(recipe.batch_size, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    metadata = torch.randn(recipe.batch_size, n_features, device=device)
    target = torch.randint(0, 6, (recipe.batch_size,), device=device)

    def step() -> None:
        with autocast(device):
            logits = model(image, metadata)
        loss = criterion(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronize(device)
    return steps * recipe.batch_size / (time.perf_counter() - start)


def benchmark_training(recipe: Recipe, manifest, data_dir: str | None, device: str = "auto", seed: int = 42,
                       num_workers: int | None = None, steps: int = 10) -> TrainBenchmark:
    """Both rates for ``recipe`` on a split (``manifest``), one epoch end to end."""
    dev = pick_device(device)
    seed_everything(seed)
    data = prepare_data(recipe, manifest, data_dir)
    model, image_config = build_model(recipe, data.preprocessor)
    model.to(dev)
    if model.uses_images:
        model.to(memory_format=torch.channels_last)
    loaders = build_loaders(recipe, data, image_config, dev, seed, num_workers)
    bound = model_bound_rate(model, recipe, data.preprocessor.n_features_out, dev, steps)

    optimizer = build_optimizer(model, recipe)
    criterion = build_criterion(recipe, loaders, dev)
    loaders.set_epoch(1)
    _synchronize(dev)
    row = train_one_epoch(model, loaders.train, criterion, optimizer, dev, recipe.grad_clip, desc="benchmark",
                          batch_transform=loaders.augment if loaders.batch_augment is not None else None,
                          metadata_transform=loaders.mask_metadata if loaders.field_dropout is not None else None)
    _synchronize(dev)
    seen = len(loaders.train) * recipe.batch_size
    return TrainBenchmark(str(dev), recipe.batch_size, recipe.image_size, recipe.augment_device, loaders.num_workers,
                          bound, row["images_per_second"], steps, seen)
