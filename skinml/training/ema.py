"""An exponential moving average of the weights (``ema_decay`` > 0), scored and saved instead
of the raw weights.

On 677 training images the weights after any one step carry that step's batch noise, and
validation picks one epoch out of twenty on that noise. The average of the recent steps is a
smoother model: validation scores it each epoch and ``best.pt`` holds it, so evaluation,
registration and serving use it unchanged (same architecture, same state dict).

The average is bias-corrected (Adam-style): after ``t`` updates it is the mean of the ``t``
weights seen, weighted ``decay ** age`` and normalised, so neither the random head the training
starts from nor a warm-up schedule enters it. BatchNorm running statistics are averaged the same
way; integer buffers (batch counters) are copied.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class WeightAverage:
    """``module``: a frozen copy of ``model`` holding the average; :meth:`update` after each step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) (0 turns the average off), got {decay}")
        self.decay = float(decay)
        self.updates = 0
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (average, live), built once per model
        self._source: nn.Module | None = None
        self.module = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)

    def weight_of_newest(self) -> float:
        """The share of the next update's weights in the average: 1 for the first update, then
        down to ``1 - decay`` (the normalisation of the decayed sum)."""
        t = self.updates + 1
        return (1.0 - self.decay) / (1.0 - self.decay ** t)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if model is not self._source:
            # The state dicts' tensors share storage with the modules (optimiser steps and
            # BatchNorm update them in place), so the pairing is made once, not every step.
            current = model.state_dict()
            self._pairs = [(averaged, current[name]) for name, averaged in self.module.state_dict().items()]
            self._source = model
        share = self.weight_of_newest()
        for averaged, value in self._pairs:
            if averaged.dtype.is_floating_point:
                averaged.lerp_(value.to(averaged.dtype), share)
            else:
                averaged.copy_(value)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates,
                "module": {k: v.detach().cpu() for k, v in self.module.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if float(state["decay"]) != self.decay:
            raise ValueError(f"the checkpoint's weight average has decay {state['decay']}, the recipe {self.decay}")
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
