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
    assert result.differences == {"recipe.lr_head": ("0.001", "0.05"), "seed": ("0", "1")}
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
    assert "trained with: lr_head 0.001 vs 0.05; seed 0 vs 1" in out.output
    written = pd.read_csv(tmp_path / "cv_compare_folds.csv")
    assert len(written) == 2 and set(written["run_a"]) == {a.run_id}
    assert set(pd.read_csv(tmp_path / "cv_compare_pooled.csv")["subset"]) == {"all", "complete"}
    logged = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                "tags.`skinml.step` = 'cv-compare'")
    assert len(logged) == 1 and f"logged as run {logged[0].info.run_id}" in out.output
    assert logged[0].data.params["run_b"] == b.run_id
    assert logged[0].data.tags["skinml.cv_differences"] == "recipe.lr_head: 0.001 vs 0.05; seed: 0 vs 1"
    assert logged[0].data.metrics["oof_all_balanced_accuracy_diff"] == pytest.approx(pooled["estimate"])
    assert logged[0].data.metrics["fold_mean_balanced_accuracy_diff"] == pytest.approx(
        (a.folds["balanced_accuracy"] - b.folds["balanced_accuracy"]).mean())
    assert {f.path for f in client.list_artifacts(logged[0].info.run_id)} == {"cv_compare_folds.csv",
                                                                             "cv_compare_pooled.csv"}
    quiet = CliRunner().invoke(cli, ["cv-compare", a.run_id, b.run_id, "--n-boot", "50", "--no-log"])
    assert quiet.exit_code == 0 and "logged as run" not in quiet.output

    # several runs a side (e.g. training seeds): each side's figures are the mean over its runs
    c = run_cv(tiny(epochs=1), k=2, data_dir=str(synthetic_dir), seed=2, num_workers=0)
    two = compare_cv(f"{a.run_id},{c.run_id}", [b.run_id], n_boot=300)
    assert two.runs_a == (a.run_id, c.run_id) and two.runs_b == (b.run_id,)
    assert two.differences == {"recipe.lr_head": ("0.001", "0.05"), "seed": ("0/2", "1")}
    for name in ("balanced_accuracy", "complete_metadata_balanced_accuracy"):
        np.testing.assert_allclose(two.folds[f"{name}_a"], (a.folds[name] + c.folds[name]) / 2)
        np.testing.assert_allclose(two.folds[f"{name}_diff"], (a.folds[name] + c.folds[name]) / 2 - b.folds[name])
    for subset, metric in (("all", "cv_oof_balanced_accuracy"), ("complete", "cv_oof_complete_metadata_balanced_accuracy")):
        pooled_two = two.pooled[subset]["balanced_accuracy"]
        assert pooled_two["a"] == pytest.approx(np.mean([client.get_run(r.run_id).data.metrics[metric] for r in (a, c)]))
        assert pooled_two["b"] == pytest.approx(client.get_run(b.run_id).data.metrics[metric])
    oof_c = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=c.run_id, artifact_path="cv_oof_predictions.csv"))
    found_c = int(((oof_c["true"] == "MEL") & (oof_c["predicted"] == "MEL")).sum())
    assert two.mel_found[0] == pytest.approx((result.mel_found[0] + found_c) / 2) and two.mel_found[1] == result.mel_found[1]
    out = CliRunner().invoke(cli, ["cv-compare", f"{a.run_id},{c.run_id}", b.run_id, "--n-boot", "300"])
    assert out.exit_code == 0, out.output
    assert "each side's figures are the mean over its runs" in out.output and "seed 0/2 vs 1" in out.output
    assert (f"pooled out-of-fold bal. acc, all rows: a {two.pooled['all']['balanced_accuracy']['a']:.3f}, "
            f"b {pooled['b']:.3f}") in out.output
    logged_two = client.get_run(out.output.split("logged as run ")[1].split()[0])
    assert logged_two.data.params["run_a"] == f"{a.run_id},{c.run_id}"
    assert logged_two.data.tags["mlflow.runName"] == f"cv-compare-{a.run_id[:8]}+{c.run_id[:8]}-{b.run_id[:8]}"
    with pytest.raises(ValueError, match="side a names a cv run twice"):
        compare_cv(f"{a.run_id},{a.run_id}", b.run_id)

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


def test_parallel_cv_trains_folds_in_worker_processes_with_the_serial_results(mlflow_store, synthetic_dir, tmp_path):
    import torch

    from skinml.training.processes import threads_per_process

    threads = torch.get_num_threads()
    torch.set_num_threads(threads_per_process(2))  # what each worker takes: the same arithmetic
    try:
        serial = run_cv(tiny(epochs=1), k=3, data_dir=str(synthetic_dir), seed=0, num_workers=0)
    finally:
        torch.set_num_threads(threads)
    parallel = run_cv(tiny(epochs=1), k=3, data_dir=str(synthetic_dir), seed=0, num_workers=0, parallel=2,
                      logs=tmp_path / "logs")

    # worker 0 took folds 0 and 2, worker 1 fold 1; each fold's outcome and log are on disk
    folder = tmp_path / "logs" / parallel.run_id
    assert sorted(p.name for p in folder.glob("fold-worker-*.log")) == ["fold-worker-0.log", "fold-worker-1.log"]
    assert sorted(p.name for p in folder.glob("fold-?.json")) == ["fold-0.json", "fold-1.json", "fold-2.json"]
    assert '"fold": 2' in (folder / "fold-worker-0.json").read_text()

    # the same folds and training seed give the same figures and out-of-fold predictions
    for name in ("balanced_accuracy", "complete_metadata_balanced_accuracy", "recall_MEL", "best_epoch", "n_val"):
        np.testing.assert_allclose(parallel.folds[name], serial.folds[name], atol=1e-9, err_msg=name)
    oof = {}
    for key, result in (("serial", serial), ("parallel", parallel)):
        path = mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="cv_oof_predictions.csv")
        oof[key] = pd.read_csv(path).sort_values(schema.IMAGE_ID).reset_index(drop=True)
    proba = [f"p_{label}" for label in schema.LABELS]
    np.testing.assert_allclose(oof["parallel"][proba], oof["serial"][proba], atol=1e-5)
    assert list(oof["parallel"]["fold"]) == list(oof["serial"]["fold"])
    assert parallel.summary["cv_oof_balanced_accuracy"] == pytest.approx(serial.summary["cv_oof_balanced_accuracy"])

    # the worker processes' runs are the cv run's children, in its experiment, as in a serial cv
    client = mlflow.MlflowClient()
    parent = client.get_run(parallel.run_id)
    assert parent.data.tags["skinml.cv_parallel"] == "2"
    for run_id in parallel.folds["train_run_id"]:
        run = client.get_run(run_id)
        assert run.data.tags["mlflow.parentRunId"] == parallel.run_id and run.info.status == "FINISHED"
        assert run.info.experiment_id == parent.info.experiment_id
        assert run.data.metrics["evalval_balanced_accuracy"] == pytest.approx(
            float(parallel.folds.set_index("train_run_id").loc[run_id, "balanced_accuracy"]))


def test_a_failed_fold_worker_fails_the_cv_run_naming_its_folds(mlflow_store, synthetic_dir, tmp_path):
    with pytest.raises(RuntimeError, match=r"cv: worker 0 \(folds \[0\]; exit 1; see .*fold-worker-0\.log\)"):
        run_cv(tiny(epochs=1, pretrained=str(tmp_path / "no-such-weights.pt")), k=2, data_dir=str(synthetic_dir),
               seed=0, num_workers=0, parallel=2, logs=tmp_path / "logs")
    client = mlflow.MlflowClient()
    [cv] = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`skinml.step` = 'cv'")
    assert cv.info.status == "FAILED"
    log = next((tmp_path / "logs").glob("*/fold-worker-0.log")).read_text()
    assert "no-such-weights.pt" in log
    with pytest.raises(ValueError, match="parallel must be at least 1"):
        run_cv(tiny(epochs=1), k=2, data_dir=str(synthetic_dir), parallel=0)
