"""Patient-grouped k-fold cross-validation: folds, child runs, out-of-fold summary."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest

from skinml.data import schema
from skinml.data.source import load_metadata
from skinml.data.split import fold_manifest, patient_folds, patient_level_split
from skinml.steps.cv import TAG_CV, TAG_FOLD, run_cv
from tests.test_training import tiny


def test_folds_group_patients_and_spread_every_class(synthetic_dir):
    manifest = patient_level_split(load_metadata(synthetic_dir), seed=0)
    pool = manifest[manifest["split"].isin(("train", "val"))]
    folds = patient_folds(pool, 3, seed=1)
    assert set(folds) == {0, 1, 2}
    assert pool.groupby(schema.PATIENT_ID).apply(lambda g: folds[g.index].nunique()).max() == 1
    # each stratum (a patient's rarest diagnosis, as the split uses) dealt evenly, to within one
    # patient's images
    from skinml.data.split import _patient_stratum

    stratum = pool[schema.PATIENT_ID].map(_patient_stratum(pool))
    counts = pd.crosstab(stratum, folds)
    largest = pool.groupby(schema.PATIENT_ID).size().max()
    assert (counts.max(axis=1) - counts.min(axis=1) <= largest).all(), counts
    for fold in range(3):
        m = fold_manifest(manifest, folds, fold)
        assert (m.loc[m["split"] == "test"].index == manifest.loc[manifest["split"] == "test"].index).all()
        assert set(m.loc[m["split"] == "val", schema.IMAGE_ID]) == set(pool.loc[folds == fold, schema.IMAGE_ID])
    pd.testing.assert_series_equal(folds, patient_folds(pool, 3, seed=1))  # seeded
    with pytest.raises(ValueError, match="k must be from 2"):
        patient_folds(pool, 1)


def test_cv_trains_each_fold_and_pools_out_of_fold(mlflow_store, synthetic_dir):
    result = run_cv(tiny(epochs=1), k=2, data_dir=str(synthetic_dir), seed=0, num_workers=0)
    client = mlflow.MlflowClient()
    children = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  f"tags.`{TAG_CV}` = '{result.run_id}'")
    trains = [r for r in children if r.data.tags["skinml.step"] == "train"]
    splits = [r for r in children if r.data.tags["skinml.step"] == "split"]
    assert len(trains) == 2 and len(splits) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {result.run_id}
    assert sorted(r.data.tags[TAG_FOLD] for r in trains) == ["0", "1"]
    oof = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="cv_oof_predictions.csv"))
    manifest = patient_level_split(load_metadata(synthetic_dir), seed=42)
    pool = manifest[manifest["split"].isin(("train", "val"))]
    assert sorted(oof[schema.IMAGE_ID]) == sorted(pool[schema.IMAGE_ID])  # every train+val image once, no test
    assert oof.groupby(schema.PATIENT_ID)["fold"].nunique().max() == 1
    parent = client.get_run(result.run_id).data.metrics
    assert parent["cv_mean_balanced_accuracy"] == pytest.approx(result.folds["balanced_accuracy"].mean())
    assert parent["cv_std_balanced_accuracy"] == pytest.approx(result.folds["balanced_accuracy"].std(ddof=1))
    assert parent["cv_oof_n"] == len(pool)
    for row in result.folds.itertuples():
        train_run = client.get_run(row.train_run_id)
        assert train_run.data.metrics["evalval_balanced_accuracy"] == pytest.approx(row.balanced_accuracy)
        assert np.isfinite(row.permuted_metadata_balanced_accuracy)


def test_cv_compare_pairs_two_runs_fold_by_fold_and_pooled(mlflow_store, synthetic_dir, tmp_path):
    from click.testing import CliRunner

    from skinml.cli import cli
    from skinml.steps.cv import compare_cv

    a = run_cv(tiny(epochs=1), k=2, data_dir=str(synthetic_dir), seed=0, num_workers=0)
    b = run_cv(tiny(epochs=1, lr_head=0.05), k=2, data_dir=str(synthetic_dir), seed=1, num_workers=0)
    result = compare_cv(a.run_id, b.run_id, n_boot=300)
    assert list(result.folds["fold"]) == [0, 1]
    for name in ("balanced_accuracy", "complete_metadata_balanced_accuracy", "recall_MEL"):
        np.testing.assert_allclose(result.folds[f"{name}_a"], a.folds[name])
        np.testing.assert_allclose(result.folds[f"{name}_b"], b.folds[name])
        np.testing.assert_allclose(result.folds[f"{name}_diff"], a.folds[name] - b.folds[name])
    client = mlflow.MlflowClient()
    for run, side in ((a, "a"), (b, "b")):  # the pooled figures are each cv run's own out-of-fold figures
        metrics = client.get_run(run.run_id).data.metrics
        assert result.pooled["all"]["balanced_accuracy"][side] == pytest.approx(metrics["cv_oof_balanced_accuracy"])
        assert result.pooled["complete"]["balanced_accuracy"][side] == pytest.approx(
            metrics["cv_oof_complete_metadata_balanced_accuracy"])
    pooled = result.pooled["all"]["balanced_accuracy"]
    assert pooled["estimate"] == pytest.approx(pooled["a"] - pooled["b"])
    assert pooled["low"] <= pooled["estimate"] <= pooled["high"] and pooled["n_boot"] == 300
    oof_a = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=a.run_id, artifact_path="cv_oof_predictions.csv"))
    mel = oof_a["true"] == "MEL"
    assert result.mel_found[0] == int((mel & (oof_a["predicted"] == "MEL")).sum()) and result.mel_found[2] == mel.sum()

    out = CliRunner().invoke(cli, ["cv-compare", a.run_id, b.run_id, "--n-boot", "200", "--out", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert f"pooled out-of-fold bal. acc, all rows: a {pooled['a']:.3f}, b {pooled['b']:.3f}" in out.output
    written = pd.read_csv(tmp_path / "cv_compare_folds.csv")
    assert len(written) == 2 and set(written["run_a"]) == {a.run_id}
    assert set(pd.read_csv(tmp_path / "cv_compare_pooled.csv")["subset"]) == {"all", "complete"}
    logged = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                "tags.`skinml.step` = 'cv-compare'")
    assert len(logged) == 1 and f"logged as run {logged[0].info.run_id}" in out.output
    assert logged[0].data.params["run_b"] == b.run_id
    assert logged[0].data.metrics["oof_all_balanced_accuracy_diff"] == pytest.approx(pooled["estimate"])
    assert logged[0].data.metrics["fold_mean_balanced_accuracy_diff"] == pytest.approx(
        (a.folds["balanced_accuracy"] - b.folds["balanced_accuracy"]).mean())
    assert {f.path for f in client.list_artifacts(logged[0].info.run_id)} == {"cv_compare_folds.csv",
                                                                             "cv_compare_pooled.csv"}
    quiet = CliRunner().invoke(cli, ["cv-compare", a.run_id, b.run_id, "--n-boot", "50", "--no-log"])
    assert quiet.exit_code == 0 and "logged as run" not in quiet.output

    # runs that do not pair, or are not finished cv runs, are refused by name
    params = client.get_run(a.run_id).data.params
    with mlflow.start_run() as other:
        mlflow.set_tag("skinml.step", "cv")
        mlflow.log_params({**params, "fold_seed": "7"})
    with pytest.raises(ValueError, match=r"param 'fold_seed' is '42' vs '7'"):
        compare_cv(a.run_id, other.info.run_id)
    with pytest.raises(ValueError, match=r"is a train run, not a `skinml cv` run"):
        compare_cv(a.run_id, a.folds["train_run_id"][0])
    with pytest.raises(ValueError, match=r"no run 'nope'"):
        compare_cv(a.run_id, "nope")
    with mlflow.start_run() as running:
        mlflow.set_tag("skinml.step", "cv")
        with pytest.raises(ValueError, match=f"cv run {running.info.run_id} is RUNNING"):
            compare_cv(a.run_id, running.info.run_id)
