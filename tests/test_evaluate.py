"""The tracked evaluation step and the run comparison."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest

from skinml import inference, tracking
from skinml.data import schema
from skinml.data.source import load_metadata
from skinml.steps.compare import compare_runs
from skinml.steps.evaluate import complete_questionnaire, evaluate_run, mask_metadata
from skinml.steps.train import train
from tests.test_training import tiny


@pytest.fixture
def trained(mlflow_store, synthetic_dir):
    first = train(tiny(epochs=2), data_dir=str(synthetic_dir), seed=0, num_workers=0)
    split = mlflow.MlflowClient().get_run(first.run_id).data.params["split_run_id"]
    return first, split


def test_masked_metadata_sets_every_field_missing(synthetic_dir, mlflow_store, trained):
    frame = load_metadata(synthetic_dir)
    masked = mask_metadata(frame)
    assert masked[list(schema.FEATURES)].isna().all().all()
    assert (masked[schema.TARGET] == frame[schema.TARGET]).all()
    state = inference.load_checkpoint(tracking.download_artifact(trained[0].run_id, inference.BEST))
    pre = inference.build_inference_bundle(state).preprocessor
    encoded = pre.transform(masked)
    # Every row becomes the same imputed vector: training means (z=0) and training modes.
    assert (encoded == encoded[0]).all()
    names = pre.get_feature_names_out()
    assert encoded[0, names.index("age")] == 0.0
    assert encoded[0, names.index("region")] == pre.vocabularies_["region"].index(pre.modes_["region"]) + 1


def test_complete_questionnaire_flags_rows(synthetic_dir):
    frame = load_metadata(synthetic_dir)
    flags = complete_questionnaire(frame)
    assert flags.sum() == frame["smoke"].notna().sum()  # synthetic rows miss all 13 together
    assert 0 < flags.sum() < len(frame)


def test_evaluate_logs_everything_and_is_repeatable(trained, synthetic_dir):
    run_id = trained[0].run_id
    first = evaluate_run(run_id, n_boot=200)
    second = evaluate_run(run_id, n_boot=200)
    timing = "test_eval_seconds"
    assert {k: v for k, v in first.metrics.items() if k != timing} == {
        k: v for k, v in second.metrics.items() if k != timing}
    m = first.metrics
    for key in ("test_accuracy", "test_balanced_accuracy", "test_auc_macro", "test_log_loss", "test_ece",
                "test_accuracy_low", "test_accuracy_high", "test_balanced_accuracy_low",
                "test_masked_metadata_accuracy", "test_complete_metadata_n", "val_test_gap_accuracy",
                "test_recall_MEL", "test_specificity_BCC", "test_mel_called_benign"):
        assert key in m, key
    assert m["test_accuracy_low"] <= m["test_accuracy"] <= m["test_accuracy_high"]
    preds = first.predictions
    test_rows = preds.shape[0]
    assert m["test_n"] == test_rows
    assert np.allclose(preds[[f"p_{label}" for label in schema.LABELS]].sum(axis=1), 1.0, atol=1e-5)
    assert (preds["predicted"] == preds[[f"p_{label}" for label in schema.LABELS]].idxmax(axis=1).str[2:]).all()

    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    assert run.data.metrics["test_accuracy"] == pytest.approx(m["test_accuracy"])
    files = {a.path.split("/")[-1]: a.file_size for a in client.list_artifacts(run_id, "evaluation/test")}
    for name in ("metrics.json", "predictions.csv", "report.txt", "confusion_matrix_counts.png",
                 "confusion_matrix_normalized.png", "confusion_matrix_counts.json", "roc_curves.png", "reliability.png"):
        assert files.get(name, 0) > 0, name
    assert "How much the score leans on metadata" in first.report and "metadata masked" in first.report
    assert "metadata permuted across rows (neutral)" in first.report
    for key in ("test_permuted_metadata_balanced_accuracy", "test_permuted_metadata_complete_balanced_accuracy",
                "test_masked_metadata_complete_n"):
        assert key in m, key
    assert (preds["predicted_permuted_metadata"] != preds["predicted_masked_metadata"]).any() or \
        m["test_permuted_metadata_accuracy"] != m["test_masked_metadata_accuracy"]
    gallery = {a.path.split("/")[-1]: a.file_size for a in client.list_artifacts(run_id, "evaluation/test/explanations")}
    assert gallery.get("gallery.html", 0) > 0 and gallery.get("gallery.json", 0) > 0
    html = tracking.download_artifact(run_id, "evaluation/test/explanations/gallery.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html and "https://" not in html  # self-contained
    assert any(name.startswith("class_") and name.endswith(".png") for name in gallery)


def test_evaluate_variant_is_logged_beside_the_run_own_figures(trained):
    run_id = trained[0].run_id
    own = evaluate_run(run_id, split="val", n_boot=0, explanations=False)
    flips = evaluate_run(run_id, split="val", n_boot=0, explanations=False, view="crop", tta="flips")
    assert set(flips.metrics) >= {"evalval_crop_flips_balanced_accuracy", "evalval_crop_flips_permuted_metadata_n"}
    assert not any(k.startswith("evalval_crop_flips") for k in own.metrics)
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    assert run.data.metrics["evalval_balanced_accuracy"] == pytest.approx(own.metrics["evalval_balanced_accuracy"])
    names = {a.path.split("/")[-1] for a in client.list_artifacts(run_id, "evaluation")}
    assert {"val", "val-crop_flips"} <= names
    # another view and four flips change the probabilities
    cols = [f"p_{label}" for label in schema.LABELS]
    assert not np.allclose(own.predictions[cols].to_numpy(), flips.predictions[cols].to_numpy())
    with pytest.raises(ValueError, match="view must be one of"):
        evaluate_run(run_id, split="val", n_boot=0, explanations=False, view="zoom")


def test_evaluate_rejects_non_training_run(trained):
    with pytest.raises(ValueError, match="not a skinml training run"):
        evaluate_run(trained[1])


def test_compare_writes_table_and_figure(trained, synthetic_dir, tmp_path):
    first, split = trained
    other = train(tiny(epochs=2, model="metadata_only"), data_dir=str(synthetic_dir), split=split, seed=0)
    for run_id in (first.run_id, other.run_id):
        evaluate_run(run_id, n_boot=50)
    table, per_run = compare_runs(out=str(tmp_path / "cmp"))
    assert set(table["model"]) == {"cnn_fusion", "metadata_only"}
    assert len(per_run) == 2
    for name in ("comparison.md", "comparison.csv", "runs.csv", "comparison.png", "results.md"):
        assert (tmp_path / "cmp" / name).stat().st_size > 0
    written = pd.read_csv(tmp_path / "cmp" / "runs.csv")
    accuracy = mlflow.MlflowClient().get_run(other.run_id).data.metrics["test_accuracy"]
    assert written.loc[written["run_id"] == other.run_id, "test_accuracy"].item() == pytest.approx(accuracy)
