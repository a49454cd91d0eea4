"""The resumable state of a training: one :class:`TrainState`, saved in ``last.pt``.

A killed run continues from it with the same weights, optimiser and scheduler state, random
generators, curves and early-stopping counter. Everything in it is plain data (tensors, lists,
numbers, strings), so checkpoints load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def capture_rng(*generators: torch.Generator) -> dict[str, Any]:
    """The global generators and ``generators`` as plain data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "generators": [g.get_state() for g in generators],
    }


def restore_rng(state: dict[str, Any], *generators: torch.Generator) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    for generator, saved in zip(generators, state["generators"], strict=True):
        generator.set_state(saved)


@dataclass
class TrainState:
    """Where a training stands after ``epoch`` finished epochs.

    ``best`` describes the selected epoch (lowest validation loss so far): ``epoch``,
    ``val_loss``, ``val_balanced_accuracy``, ``val_accuracy``.
    """

    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] = field(default_factory=lambda: {"epoch": 0, "val_loss": float("inf"),
                                                           "val_balanced_accuracy": float("nan")})
    epochs_without_improvement: int = 0
    stopped_early: bool = False

    def improved(self, val_loss: float) -> bool:
        return val_loss < self.best["val_loss"]

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "history": self.history, "best": dict(self.best),
                "epochs_without_improvement": self.epochs_without_improvement, "stopped_early": self.stopped_early}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> TrainState:
        history = list(state["history"])
        best = dict(state["best"])
        # Checkpoints written before the counter was saved: derive it from the curves.
        waiting = state.get("epochs_without_improvement",
                            sum(1 for row in history if row["epoch"] > best["epoch"]))
        return cls(int(state["epoch"]), history, best, int(waiting), bool(state.get("stopped_early", False)))
