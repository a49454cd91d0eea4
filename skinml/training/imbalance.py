"""Class-imbalance corrections: inverse-frequency loss weights and a weighted sampler.

Using both at once corrects twice: the sampler already shows classes about uniformly, and the
loss then up-weights the rare ones again, so the model under-predicts the largest class (BCC).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import WeightedRandomSampler

from skinml.data.schema import NUM_CLASSES


def class_counts(labels: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)


def inverse_frequency_weights(labels: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """``w_c = (1/n_c) / sum_j (1/n_j)`` over the classes present; absent classes get 0."""
    counts = class_counts(labels, num_classes).astype(np.float64)
    inverse = np.divide(1.0, counts, out=np.zeros_like(counts), where=counts > 0)
    return inverse / inverse.sum()


def make_sampler(labels: np.ndarray, generator: torch.Generator, num_samples: int | None = None) -> WeightedRandomSampler:
    """Draw each training image with probability proportional to 1/count(its class)."""
    weights = inverse_frequency_weights(labels)[np.asarray(labels)]
    return WeightedRandomSampler(
        torch.as_tensor(weights, dtype=torch.double), num_samples=num_samples or len(labels),
        replacement=True, generator=generator,
    )


def make_loss(labels: np.ndarray, imbalance: str, label_smoothing: float) -> nn.CrossEntropyLoss:
    weight = None
    if imbalance in ("loss", "both"):
        # The mean reduction divides by the summed weights of the batch, so their scale is moot.
        weight = torch.as_tensor(inverse_frequency_weights(labels), dtype=torch.float32)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
