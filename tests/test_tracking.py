"""MLflow store setup and the split step's run."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import pytest

from skinml import tracking
from skinml.data.source import DatasetError
from skinml.data.split import manifest_bytes
from skinml.steps.split import load_split, run_split


def test_store_lives_at_project_root(mlflow_store, monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    uri = tracking.setup_tracking()
    assert uri == f"sqlite:///{mlflow_store / 'mlflow.db'}"
    assert (mlflow_store / "mlflow.db").is_file()
    exp = mlflow.MlflowClient().get_experiment(tracking.get_experiment_id("skinml"))
    assert exp.artifact_location == (mlflow_store / "mlruns" / "0").as_uri()  # the adopted Default experiment
    other = mlflow.MlflowClient().get_experiment(tracking.get_experiment_id("other"))
    assert other.artifact_location == (mlflow_store / "mlruns" / "other").as_uri()
    assert not (tmp_path / "mlflow.db").exists()


def test_split_run_records_manifest_summary_hash_and_inputs(mlflow_store, synthetic_dir):
    ref = run_split(str(synthetic_dir), seed=42)
    run = mlflow.MlflowClient().get_run(ref.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[tracking.TAG_SPLIT_HASH] == ref.sha256
    assert run.data.tags[tracking.TAG_STEP] == "split"
    assert {a.path for a in mlflow.MlflowClient().list_artifacts(ref.run_id, "split")} == {
        "split/manifest.csv", "split/summary.csv"}
    assert sorted(i.tags[0].value for i in run.inputs.dataset_inputs) == ["test", "train", "val"]
    again = load_split(ref.run_id)
    assert manifest_bytes(again.manifest) == manifest_bytes(ref.manifest) and again.sha256 == ref.sha256
    assert run.info.artifact_uri.startswith((mlflow_store / "mlruns").as_uri())


def test_failed_split_leaves_earlier_runs(mlflow_store, synthetic_dir, tmp_path):
    ok = run_split(str(synthetic_dir))
    with pytest.raises(DatasetError, match="missing"):
        run_split(str(tmp_path / "missing"))
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [r.info.run_id for r in runs] == [ok.run_id] and runs[0].info.status == "FINISHED"


def test_cli_split_reports_bad_folder_without_traceback(mlflow_store, tmp_path):
    result = subprocess.run([sys.executable, "-m", "skinml", "split", "--data-dir", str(tmp_path / "nope")],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "nope" in result.stderr and "Traceback" not in result.stderr


def test_dataset_logged_by_a_concurrent_run_is_linked_not_fatal(mlflow_store, synthetic_dir, monkeypatch):
    """Two trainings starting together on one server race to insert the same dataset row; the
    loser's first insert fails on the primary key (seen in CI with PostgreSQL). Logging again
    links the run to the row the other inserted; the run's inputs are complete."""
    real = mlflow.log_input
    calls = []

    def racing(dataset, context=None, **kwargs):
        calls.append(context)
        if len(calls) == 1:  # the other run inserted this dataset between our lookup and our insert
            other = mlflow.MlflowClient().create_run(tracking.get_experiment_id("skinml"))
            with mlflow.start_run(run_id=other.info.run_id, nested=True):
                real(dataset, context=context)
            raise mlflow.exceptions.MlflowException(
                'BAD_REQUEST: (psycopg2.errors.UniqueViolation) duplicate key value violates unique '
                'constraint "dataset_pk"')
        return real(dataset, context=context, **kwargs)

    monkeypatch.setattr(mlflow, "log_input", racing)
    ref = run_split(str(synthetic_dir), seed=42)
    assert calls == ["train", "train", "val", "test"]  # the raced one once more, the others once
    run = mlflow.MlflowClient().get_run(ref.run_id)
    assert sorted(i.tags[0].value for i in run.inputs.dataset_inputs) == ["test", "train", "val"]


def test_other_dataset_logging_errors_are_not_retried(mlflow_store, synthetic_dir, monkeypatch):
    calls = []

    def broken(dataset, context=None, **kwargs):
        calls.append(context)
        raise mlflow.exceptions.MlflowException("INVALID_PARAMETER_VALUE: dataset schema too long")

    monkeypatch.setattr(mlflow, "log_input", broken)
    with pytest.raises(mlflow.exceptions.MlflowException, match="schema too long"):
        run_split(str(synthetic_dir), seed=42)
    assert calls == ["train"]


def test_artifact_downloads_draw_no_progress_bar_unless_asked(mlflow_store, tmp_path, capfd, monkeypatch):
    table = tmp_path / "predictions.csv"
    table.write_text("image_id,predicted\nPAT_1_1_1.png,NEV\n")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(table), artifact_path="evaluation/test")
    capfd.readouterr()
    path = tracking.download_artifact(run.info.run_id, "evaluation/test/predictions.csv")
    assert path.read_text() == table.read_text()
    assert "Downloading artifacts" not in capfd.readouterr().err
    # the bar is MLflow's and still there for whoever asks for it
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true")
    tracking.download_artifact(run.info.run_id, "evaluation/test/predictions.csv")
    assert "Downloading artifacts" in capfd.readouterr().err


@pytest.mark.parametrize(("preset", "expected"), [(None, "false"), ("true", "true")])
def test_progress_bar_default_yields_to_the_users_setting(preset, expected):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"}
    if preset is not None:
        env["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = preset
    code = "import os, skinml.tracking; print(os.environ['MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected
