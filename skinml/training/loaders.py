"""DataLoader settings for training."""

from __future__ import annotations

import os

import torch


def default_num_workers(device: torch.device) -> int:
    """Workers that keep the model fed without starving its own threads.

    On a 2-core CPU machine one worker augments while the main process trains on the other
    core's share; on CUDA the GPU is rarely the bottleneck, so use more CPU for augmentation.
    """
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        return min(8, max(1, cores - 1))
    return 1 if cores <= 4 else min(4, cores // 2)
