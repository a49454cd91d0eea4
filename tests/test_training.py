"""Training: recipes, imbalance handling, selection, resuming, tracking (tiny models, synthetic data)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from skinml import inference, tracking
from skinml.data import schema
from skinml.steps.train import train
from skinml.training.imbalance import inverse_frequency_weights, make_loss, make_sampler
from skinml.training.recipe import Recipe, resolve_recipe


def tiny(**overrides) -> Recipe:
    """A recipe that trains in seconds: tiny timm backbone, 32 px images, no pretrained weights."""
    base = dict(model="cnn_fusion", backbone="test_efficientnet", pretrained="none", epochs=3, image_size=32,
                augment_resize=36, batch_size=16)
    return resolve_recipe("default_v1", **{**base, **overrides})


def test_original_preset_is_the_status_report_recipe():
    r = resolve_recipe("original")
    a = r.augment
    assert (r.image_size, a.resize) == (224, 257)
    assert (a.hflip, a.vflip) == (0.5, 0.5)
    assert (a.brightness, a.contrast, a.saturation, a.hue) == (0.3, 0.3, 0.3, 0.05)
    assert a.rotation == 20 and a.erasing_p == 0.2 and a.blur_kernel > 0 and a.translate > 0
    assert r.imbalance == "both" and r.label_smoothing == 0.1
    assert (r.optimizer, r.lr_backbone, r.lr_head) == ("adam", 1e-5, 1e-3)
    assert (r.scheduler, r.eta_min, r.epochs, r.batch_size) == ("cosine", 1e-6, 20, 32)
    assert r.include_biopsed is False


def test_recipe_overrides_are_typed_and_checked():
    r = resolve_recipe("original", epochs="5", lr_backbone="3e-4", include_biopsed="true", augment_rotation="10")
    assert (r.epochs, r.lr_backbone, r.include_biopsed, r.augment.rotation) == (5, 3e-4, True, 10.0)
    with pytest.raises(ValueError, match="unknown recipe option 'epoch'.*epochs"):
        resolve_recipe("original", epoch=3)
    with pytest.raises(ValueError, match="imbalance must be one of"):
        resolve_recipe("original", imbalance="oversample")
    with pytest.raises(ValueError, match="unknown recipe 'fast'"):
        resolve_recipe("fast")
    assert Recipe.from_dict(r.to_dict()) == r


def test_inverse_frequency_weights_formula():
    labels = np.array([0] * 10 + [1] * 5 + [2] * 2 + [3] * 1 + [4] * 4 + [5] * 8)
    counts = np.array([10, 5, 2, 1, 4, 8], dtype=float)
    expected = (1 / counts) / (1 / counts).sum()
    np.testing.assert_allclose(inverse_frequency_weights(labels), expected)
    loss = make_loss(labels, "loss", 0.1)
    np.testing.assert_allclose(loss.weight.numpy(), expected, rtol=1e-6)
    assert loss.label_smoothing == 0.1
    assert make_loss(labels, "sampler", 0.0).weight is None


def test_sampler_draws_classes_about_uniformly():
    labels = np.array([0] * 300 + [1] * 100 + [2] * 10 + [3] * 50 + [4] * 20 + [5] * 40)
    sampler = make_sampler(labels, torch.Generator().manual_seed(0), num_samples=60_000)
    drawn = np.bincount(labels[np.fromiter(iter(sampler), dtype=np.int64)], minlength=6) / 60_000
    np.testing.assert_allclose(drawn, np.full(6, 1 / 6), atol=0.01)


def test_learns_easy_synthetic_data_and_tracks_everything(mlflow_store, synthetic_dir):
    # Colour is the synthetic classes' main cue: no colour jitter here, so learning is easy.
    recipe = tiny(epochs=10, image_size=48, augment_resize=52, lr_backbone=3e-3, lr_head=3e-3, imbalance="none",
                  label_smoothing=0.0, augment_rotation=0, augment_erasing_p=0, augment_blur_p=0,
                  augment_brightness=0, augment_contrast=0, augment_saturation=0, augment_hue=0)
    result = train(recipe, data_dir=str(synthetic_dir), seed=1, num_workers=0)
    client = mlflow.MlflowClient()
    run = client.get_run(result.run_id)
    metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
    assert run.info.status == "FINISHED"
    # Learning happens: the easy synthetic classes are separated on held-out patients.
    assert metrics["best_val_accuracy"] >= 0.85, metrics  # majority class: 0.21

    # Selection: the best epoch is the one with the lowest validation loss.
    val_losses = [m.value for m in client.get_metric_history(result.run_id, "val_loss")]
    assert len(val_losses) == 10
    assert metrics["best_epoch"] == int(np.argmin(val_losses)) + 1
    assert metrics["best_val_loss"] == pytest.approx(min(val_losses))
    best = inference.load_checkpoint(tracking.download_artifact(result.run_id, inference.BEST))
    assert best["epoch"] == metrics["best_epoch"] and best["labels"] == list(schema.LABELS)

    for key in ("model", "seed", "backbone", "weights_source", "split_run_id", "split_manifest_sha256",
                "recipe.imbalance", "recipe.lr_backbone", "recipe.augment.rotation", "data_dir"):
        assert key in params, key
    assert params["weights_source"].startswith("none")
    assert tags[tracking.TAG_FAMILY] == "fusion" and tags[tracking.TAG_MODEL] == "cnn_fusion"
    assert tags[tracking.TAG_SPLIT_HASH] == params["split_manifest_sha256"]
    # What the figures depend on besides code, data and seed: the CPU and torch's thread count.
    assert tags["skinml.torch_threads"] == str(torch.get_num_threads()) and tags["skinml.cpu"]
    assert tags["skinml.torch_version"] == torch.__version__
    assert tags["skinml.cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True)
    assert tags["skinml.git_commit"] == tags["mlflow.source.git.commit"] == head.stdout.strip()
    for name in ("train_loss", "val_accuracy", "val_balanced_accuracy", "lr_backbone", "lr_head",
                 "epoch_seconds", "images_per_second", f"val_recall_{schema.LABELS[0]}"):
        assert len(client.get_metric_history(result.run_id, name)) == 10, name
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    artifacts |= {a.path for d in ("checkpoints", "validation") for a in client.list_artifacts(result.run_id, d)}
    for path in ("checkpoints/best.pt", "checkpoints/last.pt", "validation/confusion_matrix.png",
                 "validation/confusion_matrix.json", "preprocessor.json", "labels.json", "recipe.json"):
        assert path in artifacts, path
    assert {i.tags[0].value for i in run.inputs.dataset_inputs} == {"train", "val"}
    # The split made on the way is its own, reusable run.
    assert client.get_run(params["split_run_id"]).data.tags[tracking.TAG_STEP] == "split"


def test_same_seed_same_result_and_resume_continues(mlflow_store, synthetic_dir):
    recipe = tiny(epochs=4, imbalance="sampler")
    first = train(recipe, data_dir=str(synthetic_dir), seed=3, num_workers=0)
    split = mlflow.MlflowClient().get_run(first.run_id).data.params["split_run_id"]
    again = train(recipe, data_dir=str(synthetic_dir), split=split, seed=3, num_workers=0)
    assert [h["val_loss"] for h in again.history] == pytest.approx([h["val_loss"] for h in first.history], abs=1e-6)
    assert again.best_epoch == first.best_epoch

    # Interrupt after 2 of 4 epochs, then resume: the same curve as the uninterrupted run.
    cut = train(recipe, data_dir=str(synthetic_dir), split=split, seed=3, num_workers=0, max_epochs_this_call=2)
    assert cut.epochs_run == 2
    last = inference.load_checkpoint(tracking.download_artifact(cut.run_id, inference.LAST))
    assert last["epoch"] == 2
    resumed = train(recipe, data_dir=str(synthetic_dir), resume=cut.run_id, num_workers=0)
    assert resumed.run_id == cut.run_id and resumed.epochs_run == 4
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    assert [h["val_loss"] for h in resumed.history] == pytest.approx([h["val_loss"] for h in first.history], abs=1e-5)
    history = mlflow.MlflowClient().get_metric_history(cut.run_id, "val_loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]


def test_early_stopping_and_failed_run_is_marked(mlflow_store, synthetic_dir, tmp_path):
    recipe = tiny(epochs=30, early_stopping_patience=1, lr_head=0.5, lr_backbone=0.5)
    result = train(recipe, data_dir=str(synthetic_dir), seed=0, num_workers=0)
    assert result.epochs_run < 30
    assert mlflow.MlflowClient().get_run(result.run_id).data.tags["skinml.early_stopped_at"] == str(result.epochs_run)

    broken = dataclasses.replace(recipe, backbone="no_such_backbone_xyz")
    with pytest.raises(ValueError, match="no_such_backbone_xyz"):
        train(broken, data_dir=str(synthetic_dir), seed=0, num_workers=0)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert all(r.info.status == "FINISHED" for r in runs)  # the failure never got a half-made run


def test_metadata_only_trains_without_images(mlflow_store, synthetic_dir):
    result = train(tiny(model="metadata_only", epochs=2), data_dir=str(synthetic_dir), seed=0)
    run = mlflow.MlflowClient().get_run(result.run_id)
    assert run.data.tags[tracking.TAG_FAMILY] == "baseline"
    state = inference.load_checkpoint(tracking.download_artifact(result.run_id, inference.BEST))
    assert state["image_config"] is None


def test_peak_rss_counts_a_transient_allocation():
    """The logged ``peak_rss_mb`` is the process's high-water mark (what ``/usr/bin/time -v``
    reports), not the resident memory at the epoch's end: a 400 MiB array freed again still counts."""
    code = ("import numpy as np, psutil\n"
            "from skinml.training.fit import peak_rss_mb\n"
            "before = psutil.Process().memory_info().rss / 2**20\n"
            "a = np.ones(400 * 2**18, dtype=np.float32); del a\n"
            "print(before, peak_rss_mb(), psutil.Process().memory_info().rss / 2**20)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    before, peak, now = map(float, out.split())
    assert peak - before >= 380  # the freed array is in the peak (taken over what was resident before)...
    assert peak - now >= 380  # ...and no longer resident
