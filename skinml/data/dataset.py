"""Datasets built from the decode-once image cache and the fitted metadata preprocessor.

Shared by training, evaluation and explanations; nothing here knows about MLflow or training.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from skinml.data import schema
from skinml.data.images import decode_all, default_cache_dir
from skinml.data.preprocess import MetadataPreprocessor
from skinml.data.transforms import uint8_to_tensor

log = logging.getLogger(__name__)


class LesionDataset(Dataset):
    """(image, metadata, label) triples; images come from a uint8 NHWC array.

    ``images`` may be None for models that ignore the photo (metadata_only): a 1-pixel
    placeholder is returned instead of decoding anything.
    """

    def __init__(self, images: np.ndarray | None, metadata: np.ndarray, labels: np.ndarray, transform=None):
        if images is not None and len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.metadata = torch.tensor(metadata, dtype=torch.float32)
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        if self.images is None:
            image = torch.zeros(3, 1, 1)
        else:
            image = uint8_to_tensor(self.images[index])
            if self.transform is not None:
                image = self.transform(image)
        return image, self.metadata[index], self.labels[index]


def encode_labels(frame: pd.DataFrame) -> np.ndarray:
    return frame[schema.TARGET].map(schema.LABEL_TO_INDEX).to_numpy(dtype=np.int64)


@dataclass
class SplitArrays:
    frame: pd.DataFrame
    images: np.ndarray | None
    metadata: np.ndarray
    labels: np.ndarray


def build_split_arrays(
    frame: pd.DataFrame,
    preprocessor: MetadataPreprocessor,
    image_size: int | None,
    cache: bool = True,
) -> SplitArrays:
    """Decode (once, cached) and encode one split. ``image_size=None`` skips the images."""
    frame = frame.reset_index(drop=True)
    images = None
    if image_size:
        start = time.perf_counter()
        cache_dir = default_cache_dir() if cache else None
        images = decode_all(list(frame["image_path"]), image_size, cache_dir=cache_dir)
        log.info("decoded %d images at %dpx in %.1fs", len(frame), image_size, time.perf_counter() - start)
    return SplitArrays(frame, images, preprocessor.transform(frame), encode_labels(frame))


def mask_metadata(frame: pd.DataFrame) -> pd.DataFrame:
    """Every clinical feature set to missing (identifiers, label and image path kept)."""
    masked = frame.copy()
    for column in schema.FEATURES:
        masked[column] = None
    return masked


def complete_questionnaire(frame: pd.DataFrame) -> np.ndarray:
    """True where all 13 questionnaire fields are present."""
    return frame[list(schema.QUESTIONNAIRE_FEATURES)].notna().all(axis=1).to_numpy()
