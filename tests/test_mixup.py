"""mixup (``mixup_alpha``): the blend, its weight's distribution, the blended loss, training."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch
from torch import nn

from skinml.steps.train import train
from skinml.training.mixup import MixedBatch, Mixup
from skinml.training.recipe import PRESETS, resolve_recipe
from tests.test_training import tiny


def _batch(n: int = 8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 4, 4, generator=g), torch.randn(n, 5, generator=g), torch.arange(n) % 6


def test_mixup_blends_photo_and_metadata_with_one_seeded_weight_and_partner():
    image, metadata, target = _batch()
    kept = (image.clone(), metadata.clone(), target.clone())
    mixed = Mixup(0.4)(image, metadata, target, torch.Generator().manual_seed(7))
    lam, perm = Mixup(0.4).draw(len(target), torch.Generator().manual_seed(7))  # the same draws
    assert mixed.lam == lam and 0.0 < lam < 1.0
    assert sorted(perm.tolist()) == list(range(8)) and perm.tolist() != list(range(8))
    assert torch.allclose(mixed.image, lam * image + (1 - lam) * image[perm])
    assert torch.allclose(mixed.metadata, lam * metadata + (1 - lam) * metadata[perm])
    assert torch.equal(mixed.partner, target[perm])
    # The inputs are not modified in place.
    assert torch.equal(image, kept[0]) and torch.equal(metadata, kept[1]) and torch.equal(target, kept[2])
    again = Mixup(0.4)(image, metadata, target, torch.Generator().manual_seed(7))
    other = Mixup(0.4)(image, metadata, target, torch.Generator().manual_seed(8))
    assert again.lam == mixed.lam and torch.equal(again.image, mixed.image)
    assert other.lam != mixed.lam


@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_mixup_weight_follows_beta_alpha_alpha(alpha):
    g = torch.Generator().manual_seed(1)
    lams = np.array([Mixup(alpha).draw(4, g)[0] for _ in range(4000)])
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)); standard errors ~0.006 and ~0.002 here.
    assert lams.mean() == pytest.approx(0.5, abs=0.03)
    assert lams.var() == pytest.approx(1 / (4 * (2 * alpha + 1)), abs=0.012)
    assert lams.min() >= 0 and lams.max() <= 1
    if alpha < 1:  # U-shaped: most weights near 0 or 1
        assert ((lams < 0.1) | (lams > 0.9)).mean() > 0.5


def test_mixed_loss_blends_the_criterion_on_both_targets():
    criterion = nn.CrossEntropyLoss(weight=torch.tensor([0.1, 0.3, 0.05, 0.2, 0.25, 0.1]), label_smoothing=0.1)
    logits = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1])
    partner = torch.tensor([5, 4, 3, 2, 1, 0, 1, 0])
    batch = MixedBatch(torch.empty(0), torch.empty(0), partner, 0.3)
    expected = 0.3 * criterion(logits, target) + 0.7 * criterion(logits, partner)
    assert Mixup.loss(criterion, logits, target, batch).item() == pytest.approx(expected.item(), rel=1e-6)
    whole = MixedBatch(torch.empty(0), torch.empty(0), partner, 1.0)
    assert Mixup.loss(criterion, logits, target, whole).item() == pytest.approx(criterion(logits, target).item())


def test_mixup_alpha_is_checked_and_on_only_in_the_default_preset():
    assert resolve_recipe("default").mixup_alpha == 0.2
    assert {name: resolve_recipe(name).mixup_alpha for name in PRESETS if name != "default"} == \
        dict.fromkeys(set(PRESETS) - {"default"}, 0.0)
    assert resolve_recipe("default", mixup_alpha="0.4").mixup_alpha == 0.4
    assert resolve_recipe("default", mixup_alpha="0").mixup_alpha == 0.0
    with pytest.raises(ValueError, match=r"mixup_alpha must be >= 0"):
        resolve_recipe("default", mixup_alpha=-0.1)
    with pytest.raises(ValueError, match=r"mixup_alpha must be > 0"):
        Mixup(0)


def test_training_with_mixup_is_seeded_and_resumes_exactly(mlflow_store, synthetic_dir):
    plain = train(tiny(epochs=2), data_dir=str(synthetic_dir), seed=4, num_workers=0)
    split = mlflow.MlflowClient().get_run(plain.run_id).data.params["split_run_id"]
    mixed = train(tiny(epochs=2, mixup_alpha=0.4), data_dir=str(synthetic_dir), split=split, seed=4, num_workers=0)
    assert mlflow.MlflowClient().get_run(mixed.run_id).data.params["recipe.mixup_alpha"] == "0.4"
    # mixup changes what is trained ...
    assert all(abs(m["train_loss"] - p["train_loss"]) > 1e-4 for m, p in zip(mixed.history, plain.history))
    # ... reproducibly, and a run cut after epoch 1 and resumed draws the same blends.
    again = train(tiny(epochs=2, mixup_alpha=0.4), data_dir=str(synthetic_dir), split=split, seed=4, num_workers=0)
    assert [h["val_loss"] for h in again.history] == pytest.approx([h["val_loss"] for h in mixed.history], abs=1e-6)
    cut = train(tiny(epochs=2, mixup_alpha=0.4), data_dir=str(synthetic_dir), split=split, seed=4, num_workers=0,
                max_epochs_this_call=1)
    resumed = train(tiny(epochs=2, mixup_alpha=0.4), data_dir=str(synthetic_dir), resume=cut.run_id, num_workers=0)
    assert [h["train_loss"] for h in resumed.history] == pytest.approx([h["train_loss"] for h in mixed.history],
                                                                      abs=1e-5)
