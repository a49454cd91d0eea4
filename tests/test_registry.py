"""Choosing the champion by validation, registering it with its lineage, moving the alias."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from skinml import tracking
from skinml.steps import register as registry
from skinml.steps.register import RegistryError

REPO = Path(__file__).resolve().parent.parent

# The tiny trained model comes from conftest.py's session fixture `tiny_training`.


def log_training_run(checkpoint: str | None, bacc: float, family: str = "fusion", model: str = "cnn_fusion",
                     loss: float = 1.0, status: str = "FINISHED", step: str = "train", extra_metrics=None,
                     recipe: str = "default") -> str:
    """A training run as `skinml train` leaves it: tags, params, stepless summaries, best.pt."""
    tags = {tracking.TAG_FAMILY: family, tracking.TAG_MODEL: model, tracking.TAG_RECIPE: recipe,
            tracking.TAG_SPLIT_HASH: "ab" * 32}
    with tracking.start_run(step, run_name=f"{model}-{bacc}", tags=tags) as run:
        mlflow.log_params({"backbone": "test_efficientnet", "weights_source": "none (random init)",
                           "split_manifest_sha256": "ab" * 32})
        mlflow.log_metrics({"best_val_bacc": bacc, "best_val_loss": loss, "best_epoch": 1, **(extra_metrics or {})})
        if checkpoint:
            mlflow.log_artifact(checkpoint, "checkpoints")
    if status != "FINISHED":
        MlflowClient().set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.fixture
def dummy_checkpoint(tmp_path) -> str:
    """Selection only checks that best.pt exists; registration needs a real one."""
    path = tmp_path / "dummy" / "best.pt"
    path.parent.mkdir()
    path.write_bytes(b"not loaded by selection")
    return str(path)


# -- selection ----------------------------------------------------------------------------


def test_select_best_run_by_validation_within_the_family(mlflow_store, dummy_checkpoint):
    fusion_low = log_training_run(dummy_checkpoint, 0.50, loss=0.9)
    fusion_best = log_training_run(dummy_checkpoint, 0.70, loss=1.2)
    spatial = log_training_run(dummy_checkpoint, 0.60, model="spatial_fusion", loss=0.8)
    baseline = log_training_run(dummy_checkpoint, 0.90, family="baseline", model="image_only")
    log_training_run(dummy_checkpoint, 0.95, status="FAILED")  # unfinished runs never count
    no_checkpoint = log_training_run(None, 0.80)  # ranked, but skipped: nothing to serve
    log_training_run(dummy_checkpoint, 0.99, step="evaluate")  # not a training run
    best_on_test = log_training_run(dummy_checkpoint, 0.10, extra_metrics={"test_balanced_accuracy": 0.99})
    with mlflow.start_run(experiment_id=tracking.get_experiment_id("other")):  # unrelated, same metric name
        mlflow.log_metric("best_val_bacc", 1.0)

    assert registry.select_best_run().info.run_id == fusion_best
    assert registry.select_best_run(model="spatial_fusion").info.run_id == spatial
    assert registry.select_best_run(family="baseline").info.run_id == baseline
    assert registry.select_best_run(metric="best_val_loss").info.run_id == spatial  # loss: lower wins
    best_cnn_by_loss = registry.select_best_run(family="fusion", model="cnn_fusion", metric="best_val_loss")
    assert best_cnn_by_loss.info.run_id == fusion_low
    assert [r.info.run_id for r in registry.candidate_runs()] == [no_checkpoint, fusion_best, spatial, fusion_low,
                                                                  best_on_test]
    with pytest.raises(RegistryError, match="test split is never used"):
        registry.select_best_run(metric="test_balanced_accuracy")
    with pytest.raises(RegistryError, match="no finished fusion spatial_vit training run"):
        registry.select_best_run(model="spatial_vit")


def test_select_best_run_within_a_recipe(mlflow_store, dummy_checkpoint):
    default = log_training_run(dummy_checkpoint, 0.60)
    original = log_training_run(dummy_checkpoint, 0.61, recipe="original")
    assert registry.select_best_run().info.run_id == original
    assert registry.select_best_run(recipe="default").info.run_id == default
    with pytest.raises(RegistryError, match="recipe=custom"):
        registry.select_best_run(recipe="custom")


def test_champion_decision():
    class Version:
        version = "3"

    assert registry.champion_decision(0.5, "best_val_bacc", None, None) == (True, "no champion yet")
    moved, reason = registry.champion_decision(0.6, "best_val_bacc", Version(), 0.5)
    assert moved and reason == "best_val_bacc 0.6000 beats champion v3's 0.5000"
    moved, reason = registry.champion_decision(0.5, "best_val_bacc", Version(), 0.5)  # a tie is not better
    assert not moved and reason.endswith("champion stays v3")
    assert registry.champion_decision(0.4, "best_val_loss", Version(), 0.5)[0]  # lower loss is better
    assert not registry.champion_decision(0.6, "best_val_loss", Version(), 0.5)[0]
    assert registry.champion_decision(0.1, "best_val_bacc", Version(), 0.9, force=True) == (True, "forced")
    assert not registry.champion_decision(0.9, "best_val_bacc", Version(), None)[0]
    assert registry.pip_requirements()[:2] == ["torch==2.14.1", "torchvision==0.29.1"]


def test_requirements_pin_uvicorns_fast_parser_when_installed(monkeypatch):
    import importlib.metadata

    pins = registry.pip_requirements()
    installed = {name: importlib.metadata.version(name) for name in registry.SERVER_PACKAGES}
    assert [p for p in pins if p.split("==")[0] in registry.SERVER_PACKAGES] == [
        f"{name}=={version}" for name, version in installed.items()]
    real = importlib.metadata.version

    def without(missing):
        def version(name):
            if name == missing:
                raise importlib.metadata.PackageNotFoundError(name)
            return real(name)
        return version

    # uvloop has no Windows build: the model is still logged, without the pin
    monkeypatch.setattr(importlib.metadata, "version", without("uvloop"))
    assert [p.split("==")[0] for p in registry.pip_requirements()] == [
        *registry.SERVING_PACKAGES, "httptools"]
    # a package the model imports must be there
    monkeypatch.setattr(importlib.metadata, "version", without("timm"))
    with pytest.raises(importlib.metadata.PackageNotFoundError, match="timm"):
        registry.pip_requirements()


# -- registration -------------------------------------------------------------------------


def test_alias_moves_only_on_improvement_or_force(tiny_training, mlflow_store):
    name = "alias-test"
    client = MlflowClient()
    first = log_training_run(tiny_training.checkpoint, 0.50)
    worse = log_training_run(tiny_training.checkpoint, 0.40)
    better = log_training_run(tiny_training.checkpoint, 0.60)
    baseline = log_training_run(tiny_training.checkpoint, 0.99, family="baseline", model="image_only")

    def champion() -> str:
        return str(client.get_model_version_by_alias(name, "champion").version)

    result = registry.register_run(first, name=name)
    assert (result["version"], result["alias_moved"], result["reason"]) == ("1", True, "no champion yet")
    result = registry.register_run(worse, name=name)
    assert (result["version"], result["alias_moved"]) == ("2", False) and champion() == "1"
    assert result["reason"] == "best_val_bacc 0.4000 does not beat champion v1's 0.5000; champion stays v1"
    assert client.get_model_version(name, "2").tags["skinml.champion_decision"] == result["reason"]

    result = registry.register_best(name=name)  # chooses `better`, never the baseline
    assert result["run_id"] == better and result["run_id"] != baseline
    assert (result["version"], result["alias_moved"], result["champion_version"]) == ("3", True, "3")
    assert champion() == "3"

    again = registry.register_best(name=name)  # already registered: nothing new
    assert (again["registered"], again["version"], again["alias_moved"]) == (False, "3", False)
    assert "already version 3" in again["reason"]
    assert len(client.search_model_versions(f"name = '{name}'")) == 3

    forced = registry.register_run(worse, name=name, force=True)
    assert (forced["version"], forced["alias_moved"], forced["reason"]) == ("4", True, "forced")
    assert champion() == "4"
    assert not any(v.current_stage not in (None, "None") for v in client.search_model_versions(f"name = '{name}'"))


def test_registered_version_records_lineage(tiny_training, monkeypatch, request):
    """A real training run (tiny recipe, 1 epoch on synthetic data), plus an evaluate step's metrics."""
    request.addfinalizer(lambda uri=mlflow.get_tracking_uri(): mlflow.set_tracking_uri(uri))
    monkeypatch.setenv("SKINML_HOME", tiny_training.home)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{Path(tiny_training.home) / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    tracking.setup_tracking()
    client = MlflowClient()
    client.log_metric(tiny_training.run_id, "test_balanced_accuracy", 0.25)  # as the evaluate step logs it
    train_run = client.get_run(tiny_training.run_id)

    result = registry.register_best(name="lineage-test", pixel_limit=2_000_000)
    assert result["run_id"] == tiny_training.run_id and result["registered"]
    version = client.get_model_version("lineage-test", result["version"])
    tags = version.tags
    params = train_run.data.params
    assert tags["skinml.train_run_id"] == tiny_training.run_id
    assert tags["skinml.backbone"] == params["backbone"] == "test_efficientnet"
    assert tags["skinml.weights_source"] == params["weights_source"]
    assert tags["skinml.split_manifest_sha256"] == params["split_manifest_sha256"] == \
        train_run.data.tags[tracking.TAG_SPLIT_HASH]
    assert float(tags["skinml.val.best_val_bacc"]) == train_run.data.metrics["best_val_bacc"]
    assert float(tags["skinml.val.best_val_loss"]) == train_run.data.metrics["best_val_loss"]
    assert float(tags["skinml.test.test_balanced_accuracy"]) == 0.25
    assert tags["skinml.git_commit"] == train_run.data.tags.get("skinml.git_commit", "unknown")
    assert tags["skinml.selection_metric"] == "best_val_bacc" and tags["skinml.max_pixels"] == "2000000"
    assert tiny_training.run_id in version.description and "test_balanced_accuracy=0.25" in version.description
    assert str(client.get_model_version_by_alias("lineage-test", "champion").version) == str(version.version)

    # The model was logged in a `register` run that points back at the training run.
    register_run = client.get_run(version.run_id)
    assert version.run_id == result["register_run_id"] != tiny_training.run_id
    assert register_run.data.tags[tracking.TAG_STEP] == "register"
    assert register_run.data.tags[tracking.TAG_TRAIN_RUN] == tiny_training.run_id
    assert register_run.info.experiment_id == train_run.info.experiment_id

    local = Path(mlflow.artifacts.download_artifacts(f"models:/lineage-test/{version.version}"))
    requirements = (local / "requirements.txt").read_text().split()
    assert {"torch==2.14.1", "torchvision==0.29.1"} <= set(requirements)
    assert {r.split("==")[0] for r in requirements} >= set(registry.SERVING_PACKAGES)
    assert (local / "code" / "skinml" / "serving" / "schema.py").is_file()
    assert not list((local / "code").rglob("__pycache__"))
    assert json.loads((local / "artifacts" / "labels.json").read_text()) == ["ACK", "BCC", "MEL", "NEV", "SCC", "SEK"]
    assert json.loads((local / "artifacts" / "preprocessor.json").read_text())["format_version"] == 1
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert mlmodel["flavors"]["python_function"]["config"]["max_pixels"] == 2_000_000
    assert (local / "pyfunc_model.py").is_file()  # models-from-code: MLflow loads this copy
    # No input schema: MLflow would drop unknown columns before the model could refuse them; the
    # accepted columns are documented by the input example instead.
    assert mlmodel["signature"].get("inputs") is None
    assert [p["name"] for p in json.loads(mlmodel["signature"]["params"])] == ["top_k", "explain", "allow_extra_columns"]
    example = json.loads((local / "serving_input_example.json").read_text())
    assert {"image", "age", "region"} <= set(example["dataframe_split"]["columns"])


def test_register_refuses_what_it_cannot_register(mlflow_store, dummy_checkpoint):
    evaluate = log_training_run(dummy_checkpoint, 0.5, step="evaluate")
    failed = log_training_run(dummy_checkpoint, 0.5, status="FAILED")
    without = log_training_run(None, 0.5)
    with pytest.raises(RegistryError, match="is not a training run"):
        registry.register_run(evaluate)
    with pytest.raises(RegistryError, match="is FAILED, not FINISHED"):
        registry.register_run(failed)
    with pytest.raises(RegistryError, match="has no checkpoints/best.pt"):
        registry.register_run(without)
    with pytest.raises(RegistryError, match="test split is never used"):
        registry.register_run(without, metric="test_accuracy")
    with pytest.raises(RegistryError, match="no finished fusion training run"):
        registry.register_best(family="fusion", experiment_ids=[tracking.get_experiment_id("empty")])


def test_cli_register_and_entry_point(tiny_training, mlflow_store, monkeypatch, capsys):
    from skinml.cli import cli

    good = log_training_run(tiny_training.checkpoint, 0.5)
    log_training_run(tiny_training.checkpoint, 0.9, family="baseline", model="metadata_only")
    runner = CliRunner()
    result = runner.invoke(cli, ["register", "--name", "cli-test", "--experiment", "skinml"])
    assert result.exit_code == 0, result.output
    assert f"registered cli-test version 1 from training run {good} (best_val_bacc=0.5000)" in result.output
    assert "champion: v1 (no champion yet)" in result.output

    refused = runner.invoke(cli, ["register", "--name", "cli-test", "--metric", "test_balanced_accuracy"])
    assert refused.exit_code != 0 and "test split is never used" in refused.output
    assert "Traceback" not in refused.output

    # entrypoints/register.py (the MLproject entry point) forwards its arguments to `skinml register`.
    monkeypatch.setattr(sys, "argv", ["register.py", "--name", "cli-test", "--run-id", good, "--force", "false"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(REPO / "entrypoints" / "register.py"), run_name="__main__")
    assert exited.value.code == 0
    assert "kept cli-test version 1" in capsys.readouterr().out
