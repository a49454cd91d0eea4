"""The project's shape: names defined once, a CLI that answers at once, deprecated names, reuse."""

from __future__ import annotations

import subprocess
import sys
import warnings

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner

from skinml import constants, tracking
from skinml.cli import cli
from skinml.data import source
from skinml.data.split import manifest_bytes, patient_level_split
from skinml.steps.reuse import find_finished_run
from skinml.steps.split import run_split, split_params
from skinml.training.recipe import PRESETS, resolve_recipe


def test_cli_constants_are_the_librarys():
    from skinml.models import MODEL_NAMES, model_class

    assert constants.MODEL_NAMES == MODEL_NAMES
    assert set(constants.RECIPE_PRESETS) == set(PRESETS)
    assert {model_class(name).family for name in MODEL_NAMES} <= set(constants.MODEL_FAMILIES)


def test_cli_import_pulls_in_neither_torch_nor_mlflow():
    code = "import sys, skinml.cli; print(sorted(m for m in ('torch', 'torchvision', 'mlflow', 'timm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_bad_options_fail_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("SKINML_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    runner = CliRunner()
    result = runner.invoke(cli, ["train", "--model", "nope"])
    assert result.exit_code == 2 and "Invalid value for '--model'" in result.output and "cnn_fusion" in result.output
    result = runner.invoke(cli, ["train", "--epochs", "many"])
    assert result.exit_code == 2 and "'many' is not a valid integer" in result.output
    result = runner.invoke(cli, ["train", "--set", "epochs"])
    assert result.exit_code == 2 and "KEY=VALUE" in result.output
    result = runner.invoke(cli, ["train", "--set", "epoch=3"])  # an unknown recipe field, named with the valid ones
    assert result.exit_code == 1 and "unknown recipe option 'epoch'" in result.output
    result = runner.invoke(cli, ["evaluate", "--run-id", "x", "--device", "gpu"])
    assert result.exit_code == 2 and "'gpu' is not a device" in result.output
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_mlproject_empty_strings_mean_unset():
    """`mlflow run` passes unset parameters as '' ; typed options must read them as "not given"."""
    from skinml.cli.training import train

    args = ["--epochs", "", "--imbalance", "", "--include-biopsed", "", "--lr-backbone", "", "--split", "",
            "--recipe", "", "--metadata-encoding", ""]
    params = train.make_context("train", args).params
    assert params["epochs"] is params["imbalance"] is params["include_biopsed"] is params["lr_backbone"] is None
    assert params["split_ref"] is None and params["recipe"] == "default" and params["metadata_encoding"] is None
    params = train.make_context("train", ["--epochs", "3", "--include-biopsed", "true", "--imbalance", "loss"]).params
    assert (params["epochs"], params["include_biopsed"], params["imbalance"]) == (3, True, "loss")


def test_deprecated_names_still_work_with_a_warning(synthetic_dir):
    with pytest.warns(FutureWarning, match="recipe 'seed' is deprecated.*'original'"):
        old = resolve_recipe("seed")
    assert old == resolve_recipe("original") and old.preset == "original"
    frame = source.load_metadata(synthetic_dir)
    with pytest.warns(FutureWarning, match="split strategy 'seed' is deprecated.*'random'"):
        old_split = patient_level_split(frame, strategy="seed")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert manifest_bytes(old_split) == manifest_bytes(patient_level_split(frame, strategy="random"))
    result = CliRunner().invoke(cli, ["split", "--strategy", "nope"])
    assert result.exit_code == 2 and "'stratified', 'random'" in result.output


def test_fresh_store_runs_land_in_one_training_experiment(mlflow_store):
    client = mlflow.MlflowClient()
    experiment = client.get_experiment("0")  # where `mlflow run .` puts runs unless told otherwise
    assert experiment.name == constants.EXPERIMENT_NAME
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert tracking.get_experiment_id() == "0"
    other = client.get_experiment(tracking.get_experiment_id("elsewhere"))
    assert other.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_a_store_with_default_runs_is_left_alone(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'other.db'}"
    monkeypatch.setenv("SKINML_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    SqlAlchemyStore(uri, (tmp_path / "mlruns").as_uri())
    mlflow.set_tracking_uri(uri)
    mlflow.MlflowClient().create_run("0")  # someone's run in Default
    tracking._initialised.discard(uri)
    tracking.setup_tracking()
    assert mlflow.MlflowClient().get_experiment("0").name == "Default"
    assert tracking.get_experiment_id() != "0"


def test_reuse_matches_every_parameter_and_the_commit(mlflow_store, synthetic_dir):
    first = run_split(str(synthetic_dir))
    data_dir = mlflow.MlflowClient().get_run(first.run_id).data.params["data_dir"]
    same = split_params(data_dir, 42, "stratified", 0.15, 0.15, False)
    assert find_finished_run("split", same).info.run_id == first.run_id
    # Different fractions are a different split (the old lookup compared seed and strategy only).
    assert find_finished_run("split", {**same, "val_fraction": 0.2}) is None
    assert find_finished_run("split", same, git_commit="0" * 40) is None
    assert find_finished_run("train", same) is None


def test_manifest_is_a_plain_table(synthetic_dir):
    manifest = patient_level_split(source.load_metadata(synthetic_dir))
    assert isinstance(manifest, pd.DataFrame) and set(manifest["split"]) == {"train", "val", "test"}
