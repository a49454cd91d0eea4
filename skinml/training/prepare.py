"""Everything a training needs before its first epoch: data, model, loaders, loss.

Each function is one step of :func:`skinml.steps.train.train`, usable on its own (tests, the
sweep, benchmarks). No MLflow in here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, RandomSampler

from skinml.data.dataset import LesionDataset, SplitArrays, build_split_arrays
from skinml.data.preprocess import MetadataPreprocessor
from skinml.data.source import load_metadata
from skinml.data.split import attach_split
from skinml.data.transforms import ImageConfig, build_eval_transform, build_train_transform
from skinml.models import SkinClassifier, create_model, model_class
from skinml.training.augment import BatchAugment
from skinml.training.distributed import DistInfo, GlobalBatchSlices, per_rank_batch
from skinml.training.imbalance import make_loss, make_sampler
from skinml.training.loaders import default_num_workers
from skinml.training.mixup import MixedBatch, Mixup
from skinml.training.modality import FieldDropout
from skinml.training.recipe import Recipe


@dataclass
class TrainingData:
    """The rows of a split with the preprocessor fitted on its training rows only."""

    frame: pd.DataFrame  # every row of the split, with its ``split`` column
    preprocessor: MetadataPreprocessor
    train: pd.DataFrame
    val: pd.DataFrame


def validate_recipe(recipe: Recipe) -> None:
    """Fail on an unknown model, option or backbone before any split, run or decode happens."""
    from skinml.models.backbones import check_backbone_name
    from skinml.models.registry import model_options as accepted_options

    cls = model_class(recipe.model)
    options = model_options(recipe)
    unknown = sorted(set(options) - set(accepted_options(recipe.model)))
    if unknown:
        raise ValueError(f"unknown option(s) for model {recipe.model!r}: {', '.join(unknown)}")
    if cls.backbone_option and options.get(cls.backbone_option):
        check_backbone_name(options[cls.backbone_option], cls.backbone_option)


def prepare_data(recipe: Recipe, manifest: pd.DataFrame, data_dir: str | None,
                 drop_missing_images: bool = False) -> TrainingData:
    frame = attach_split(load_metadata(data_dir, drop_missing_images=drop_missing_images), manifest)
    train, val = (frame[frame["split"] == name] for name in ("train", "val"))
    preprocessor = MetadataPreprocessor(recipe.include_biopsed, recipe.missing_indicators, recipe.metadata_encoding)
    preprocessor.fit(train)
    return TrainingData(frame, preprocessor, train, val)


def model_options(recipe: Recipe) -> dict[str, Any]:
    """Recipe -> create_model options; the model class says which option takes the backbone."""
    options = dict(recipe.model_options)
    cls = model_class(recipe.model)
    if cls.backbone_option:
        if recipe.backbone:
            options.setdefault(cls.backbone_option, recipe.backbone)
        options.setdefault("pretrained", recipe.pretrained)
    return options


def build_model(recipe: Recipe, preprocessor: MetadataPreprocessor) -> tuple[SkinClassifier, ImageConfig | None]:
    """The model and, if it looks at the photo, the image view its weights expect."""
    model = create_model(recipe.model, preprocessor.n_features_out, **model_options(recipe))
    if recipe.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if not model.uses_images:
        return model, None
    data_config = model.data_config
    resize = recipe.train_decode_size if recipe.eval_view == "crop" else 0
    return model, ImageConfig(image_size=recipe.image_size, mean=tuple(data_config["mean"]),
                              std=tuple(data_config["std"]), resize=resize)


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A seed for one random stream of one epoch, independent of what earlier epochs drew."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1, np.uint64)[0])


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    train_arrays: SplitArrays
    val_arrays: SplitArrays
    sampler_generator: torch.Generator
    loader_generator: torch.Generator
    num_workers: int
    seed: int
    #: Batched augmentation on the training device (``augment_device="batch"``), else None.
    batch_augment: BatchAugment | None = None
    augment_generator: torch.Generator | None = None
    #: Questionnaire dropout (``questionnaire_dropout`` > 0), else None.
    field_dropout: FieldDropout | None = None
    dropout_generator: torch.Generator | None = None
    #: mixup (``mixup_alpha`` > 0), else None.
    mixup: Mixup | None = None
    mixup_generator: torch.Generator | None = None
    #: This process's rank under torchrun (0 alone): its augmentation and dropout draws differ.
    rank: int = 0

    def _stream(self, stream: int) -> int:
        return stream if self.rank == 0 else stream + 100 * self.rank

    def mask_metadata(self, metadata: torch.Tensor) -> torch.Tensor:
        """The training view of a metadata batch (identity without questionnaire dropout)."""
        if self.field_dropout is None:
            return metadata
        return self.field_dropout(metadata, self.dropout_generator)

    def mix(self, image: torch.Tensor, metadata: torch.Tensor, target: torch.Tensor) -> MixedBatch | None:
        """The batch blended by mixup (None without it)."""
        if self.mixup is None:
            return None
        return self.mixup(image, metadata, target, self.mixup_generator)

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        """The training view of a uint8 batch already on the device (identity without batching)."""
        if self.batch_augment is None:
            return images
        return self.batch_augment(images, self.augment_generator)

    def set_epoch(self, epoch: int) -> None:
        """Seed the epoch's sampling order and worker seeds from (seed, epoch).

        Workers are started anew each epoch and take their seeds from the loader generator, so
        an epoch draws the same augmentations whether the run was resumed before it or not,
        with any number of workers.
        """
        self.sampler_generator.manual_seed(epoch_seed(self.seed, epoch, 0))
        self.loader_generator.manual_seed(epoch_seed(self.seed, epoch, 1))
        if self.augment_generator is not None:
            self.augment_generator.manual_seed(epoch_seed(self.seed, epoch, self._stream(2)))
        if self.dropout_generator is not None:
            self.dropout_generator.manual_seed(epoch_seed(self.seed, epoch, self._stream(3)))
        if self.mixup_generator is not None:
            self.mixup_generator.manual_seed(epoch_seed(self.seed, epoch, self._stream(4)))


def build_loaders(recipe: Recipe, data: TrainingData, image_config: ImageConfig | None, device: torch.device,
                  seed: int, num_workers: int | None = None, cache_images: bool = True,
                  dist_info: DistInfo | None = None) -> Loaders:
    """Decode each split once (cached), then the augmenting train loader and the val loader.

    Under torchrun (``dist_info`` with several processes) the train loader yields this rank's
    slice of each global batch (:class:`~skinml.training.distributed.GlobalBatchSlices`).
    """
    dist_info = dist_info or DistInfo()
    uses_images = image_config is not None
    train_size = recipe.train_decode_size if uses_images else None
    train_arrays = build_split_arrays(data.train, data.preprocessor, train_size, cache=cache_images)
    val_arrays = build_split_arrays(data.val, data.preprocessor, image_config.decode_size if uses_images else None,
                                    cache=cache_images)
    batched = uses_images and recipe.augment_device == "batch"
    # Batched: the loader only stacks uint8 crops; augmentation happens on the device.
    train_tf = build_train_transform(image_config, recipe.augment) if uses_images and not batched else None
    eval_tf = build_eval_transform(image_config) if uses_images else None
    sampler_gen = torch.Generator().manual_seed(seed)
    loader_gen = torch.Generator().manual_seed(seed + 1)
    if num_workers is None:
        # Batched augmentation leaves the loader only indexing a uint8 array: on a CPU, worker
        # processes would just compete with the model for cores (0 workers: 15.8 vs 8.8 images/s
        # end to end on 2 cores, README "Augmentation on the device").
        num_workers = 0 if batched and device.type == "cpu" else default_num_workers(device)
    workers = num_workers if uses_images else 0
    pin = device.type == "cuda"
    use_sampler = recipe.imbalance in ("sampler", "both")
    train_set = LesionDataset(train_arrays.images, train_arrays.metadata, train_arrays.labels, train_tf)
    drop_last = len(train_arrays.labels) > recipe.batch_size  # BatchNorm needs >1 row per batch
    sampler = make_sampler(train_arrays.labels, sampler_gen) if use_sampler else None
    batch_size = recipe.batch_size
    if dist_info.enabled:
        base = sampler if sampler is not None else RandomSampler(train_set, generator=loader_gen)
        sampler = GlobalBatchSlices(base, recipe.batch_size, dist_info.rank, dist_info.world_size, drop_last)
        batch_size = per_rank_batch(recipe.batch_size, dist_info)
    train_loader = DataLoader(
        train_set,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=sampler is None,
        generator=loader_gen,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=False,  # restarted each epoch: see Loaders.set_epoch
        drop_last=drop_last,
    )
    val_loader = DataLoader(
        LesionDataset(val_arrays.images, val_arrays.metadata, val_arrays.labels, eval_tf),
        batch_size=max(64, recipe.batch_size), shuffle=False, num_workers=0, pin_memory=pin,
    )
    loaders = Loaders(train_loader, val_loader, train_arrays, val_arrays, sampler_gen, loader_gen, workers, seed,
                      rank=dist_info.rank)
    if batched:
        loaders.batch_augment = BatchAugment(image_config, recipe.augment)
        loaders.augment_generator = torch.Generator().manual_seed(epoch_seed(seed, 0, loaders._stream(2)))
    if recipe.questionnaire_dropout > 0:
        loaders.field_dropout = FieldDropout(data.preprocessor, recipe.questionnaire_dropout)
        loaders.dropout_generator = torch.Generator().manual_seed(epoch_seed(seed, 0, loaders._stream(3)))
    if recipe.mixup_alpha > 0:
        loaders.mixup = Mixup(recipe.mixup_alpha)
        loaders.mixup_generator = torch.Generator().manual_seed(epoch_seed(seed, 0, loaders._stream(4)))
    return loaders


def build_criterion(recipe: Recipe, loaders: Loaders, device: torch.device):
    return make_loss(loaders.train_arrays.labels, recipe.imbalance, recipe.label_smoothing).to(device)
