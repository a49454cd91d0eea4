"""mixup: train on blends of two samples, the photo and the answers alike (``mixup_alpha`` > 0).

Zhang et al., "mixup: Beyond Empirical Risk Minimization" (ICLR 2018). Each training batch is
paired with a shuffled copy of itself; both inputs, the augmented photo and the encoded
metadata, are blended with one weight ``lam ~ Beta(alpha, alpha)`` drawn per batch, and the
loss is ``lam * L(logits, y) + (1 - lam) * L(logits, y[perm])``. Blending the losses rather than
the targets keeps the criterion as it is (class weights, label smoothing, and the weighted mean's
normalisation of each term). It runs after augmentation and questionnaire dropout, on the
training device; evaluation never sees it. The logged ``train_loss`` is the blended loss, so it
is higher than a run without mixup and not comparable with one.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


class MixedBatch(NamedTuple):
    image: torch.Tensor
    metadata: torch.Tensor
    partner: torch.Tensor  # the target of the sample each row was blended with
    lam: float  # the weight of the row's own sample


class Mixup:
    """Blend each sample of a batch with another of the same batch, one weight per batch."""

    def __init__(self, alpha: float) -> None:
        if not alpha > 0:
            raise ValueError(f"mixup_alpha must be > 0 (0 turns mixup off), got {alpha}")
        self.alpha = float(alpha)

    def draw(self, batch_size: int, generator: torch.Generator) -> tuple[float, torch.Tensor]:
        """The batch's weight and partner order; everything comes from ``generator``."""
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        lam = float(np.random.default_rng(seed).beta(self.alpha, self.alpha))
        return lam, torch.randperm(batch_size, generator=generator)

    def __call__(self, image: torch.Tensor, metadata: torch.Tensor, target: torch.Tensor,
                 generator: torch.Generator) -> MixedBatch:
        lam, perm = self.draw(len(target), generator)
        perm_image = perm.to(image.device)
        mixed_image = image.mul(lam).add_(image[perm_image], alpha=1.0 - lam)
        perm_meta = perm.to(metadata.device)
        mixed_meta = metadata.mul(lam).add_(metadata[perm_meta], alpha=1.0 - lam)
        return MixedBatch(mixed_image, mixed_meta, target[perm.to(target.device)], lam)

    @staticmethod
    def loss(criterion, logits: torch.Tensor, target: torch.Tensor, batch: MixedBatch) -> torch.Tensor:
        return batch.lam * criterion(logits, target) + (1.0 - batch.lam) * criterion(logits, batch.partner)
