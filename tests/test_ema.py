"""The weight average (``ema_decay``): its arithmetic, what training scores and saves, resuming."""

from __future__ import annotations

import mlflow
import pytest
import torch
from torch import nn

from skinml import inference, tracking
from skinml.steps.train import train
from skinml.training.ema import WeightAverage
from skinml.training.recipe import resolve_recipe
from tests.test_training import tiny


def _set(model: nn.Module, value: float, mean: float, batches: int) -> None:
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(value)
    model[1].running_mean.fill_(mean)
    model[1].num_batches_tracked.fill_(batches)


def test_weight_average_is_the_normalised_decayed_mean_of_the_weights_seen():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    _set(model, -5.0, -5.0, 0)  # the starting point: never part of the average
    average = WeightAverage(model, decay=0.5)
    seen = [(1.0, 10.0, 1), (2.0, 20.0, 2), (4.0, 40.0, 3)]
    for value, mean, batches in seen:
        _set(model, value, mean, batches)
        average.update(model)
    weights = [0.5 ** 2, 0.5, 1.0]  # oldest first: decay ** age
    expected = sum(w * v for w, (v, _, _) in zip(weights, seen)) / sum(weights)  # (0.25 + 1 + 4) / 1.75 = 3.0
    expected_mean = sum(w * m for w, (_, m, _) in zip(weights, seen)) / sum(weights)
    for param in average.module.parameters():
        assert torch.allclose(param, torch.full_like(param, expected))
        assert not param.requires_grad
    assert torch.allclose(average.module[1].running_mean, torch.full((2,), expected_mean))
    assert int(average.module[1].num_batches_tracked) == 3  # integer buffers are copied, not averaged
    assert average.updates == 3 and not average.module.training
    # The model itself is untouched, and the state round-trips.
    assert all(torch.all(p == 4.0) for p in model.parameters())
    other = WeightAverage(model, decay=0.5)
    other.load_state_dict(average.state_dict())
    assert other.updates == 3 and torch.equal(other.module[0].weight, average.module[0].weight)
    with pytest.raises(ValueError, match="decay 0.5, the recipe 0.9"):
        WeightAverage(model, decay=0.9).load_state_dict(average.state_dict())


def test_ema_decay_outside_its_range_is_refused():
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\)"):
        resolve_recipe("default", ema_decay=1)
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\)"):
        resolve_recipe("default", ema_decay=-0.1)
    assert resolve_recipe("default").ema_decay == 0.0  # off unless asked


def test_training_scores_and_saves_the_average_and_resumes_it(mlflow_store, synthetic_dir):
    plain = train(tiny(epochs=3), data_dir=str(synthetic_dir), seed=4, num_workers=0)
    split = mlflow.MlflowClient().get_run(plain.run_id).data.params["split_run_id"]
    averaged = train(tiny(epochs=3, ema_decay=0.9), data_dir=str(synthetic_dir), split=split, seed=4, num_workers=0)
    # The average does not change what is trained, only what is scored.
    assert [h["train_loss"] for h in averaged.history] == pytest.approx([h["train_loss"] for h in plain.history],
                                                                       abs=1e-6)
    assert all(abs(a["val_loss"] - p["val_loss"]) > 1e-6 for a, p in zip(averaged.history, plain.history))

    # After one epoch the selected checkpoint is the average, and last.pt keeps the raw weights to resume.
    cut = train(tiny(epochs=3, ema_decay=0.9), data_dir=str(synthetic_dir), split=split, seed=4, num_workers=0,
                max_epochs_this_call=1)
    best = inference.load_checkpoint(tracking.download_artifact(cut.run_id, inference.BEST))
    last = inference.load_checkpoint(tracking.download_artifact(cut.run_id, inference.LAST))
    assert best["epoch"] == 1 and last["weight_average"]["decay"] == 0.9
    for name, value in best["model_state"].items():
        assert torch.equal(value, last["weight_average"]["module"][name]), name
    assert any(not torch.equal(value, last["model_state"][name])
               for name, value in best["model_state"].items() if value.is_floating_point())

    resumed = train(tiny(epochs=3, ema_decay=0.9), data_dir=str(synthetic_dir), resume=cut.run_id, num_workers=0)
    assert [h["val_loss"] for h in resumed.history] == pytest.approx([h["val_loss"] for h in averaged.history],
                                                                    abs=1e-5)
