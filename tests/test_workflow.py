"""The main job (split -> train -> evaluate -> register) and the study plan."""

from __future__ import annotations

import mlflow

from skinml import tracking
from skinml.steps.main import run_main
from skinml.steps.study import comparison_jobs
from tests.test_training import tiny


def _runs(step: str) -> list:
    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`{tracking.TAG_STEP}` = '{step}'")


def test_main_runs_every_step_as_children_and_reuses_when_asked(mlflow_store, synthetic_dir):
    recipe = tiny(epochs=2)
    result = run_main(recipe, data_dir=str(synthetic_dir), n_boot=50, model_name="test-model")
    client = mlflow.MlflowClient()
    parent = client.get_run(result["main_run_id"])
    assert parent.info.status == "FINISHED"
    for key in ("split_run_id", "train_run_id"):
        child = client.get_run(result[key])
        assert child.data.tags["mlflow.parentRunId"] == result["main_run_id"], key
    train_run = client.get_run(result["train_run_id"])
    assert train_run.data.params["split_run_id"] == result["split_run_id"]
    assert "test_balanced_accuracy" in train_run.data.metrics
    assert parent.data.metrics["test_balanced_accuracy"] == train_run.data.metrics["test_balanced_accuracy"]
    registered = result["registered"]
    # Registered, but a tiny recipe (default_v1 with overridden epochs, sizes, backbone) never takes `champion`:
    # the main job applies register's rule (only the validation-chosen recipe as chosen competes).
    assert registered["run_id"] == result["train_run_id"] and registered["registered"]
    assert registered["alias_moved"] is False and "not the validation-chosen" in registered["reason"]
    assert registered["champion_version"] is None

    again = run_main(recipe, data_dir=str(synthetic_dir), n_boot=50, model_name="test-model", reuse=True)
    assert again["split_run_id"] == result["split_run_id"]
    assert again["train_run_id"] == result["train_run_id"]
    assert len(_runs("train")) == 1 and len(_runs("split")) == 1
    # A different recipe is not "the same inputs": it trains anew on the reused split.
    third = run_main(tiny(epochs=1), data_dir=str(synthetic_dir), n_boot=50, model_name="test-model", reuse=True,
                     register=False)
    assert third["split_run_id"] == result["split_run_id"] and third["train_run_id"] != result["train_run_id"]


def test_baseline_is_trained_and_evaluated_but_not_registered(mlflow_store, synthetic_dir):
    result = run_main(tiny(model="metadata_only", epochs=1), data_dir=str(synthetic_dir), n_boot=20)
    assert "registered" not in result
    assert not mlflow.MlflowClient().search_registered_models()


def test_study_plan_puts_the_research_question_first():
    jobs = comparison_jobs((42, 43, 44), "default", {}, None)
    names = [j.name for j in jobs]
    assert names[:4] == ["default-s42", "original-recipe-s42", "metadata_only-default-s42", "image_only-default-s42"]
    assert {"default-imbalance-sampler-s42", "default-imbalance-both-s42"} <= set(names)
    assert "default-imbalance-loss-s42" not in names  # the default recipe already uses loss weights
    assert sum(n.startswith("default-s") for n in names) == 3 and sum(n.startswith("original-recipe") for n in names) == 3
    spatial = next(j for j in jobs if j.model == "spatial_fusion")
    assert spatial.overrides["backbone"] == "efficientnet_lite0" and "vit_pretrained" in spatial.overrides["model_options"]


def test_main_under_mlflow_run_uses_its_run_as_the_parent(mlflow_store, synthetic_dir, monkeypatch):
    """`mlflow run` creates the run and passes MLFLOW_RUN_ID; the steps must become its children."""
    client = mlflow.MlflowClient()
    outer = client.create_run(tracking.get_experiment_id("skinml")).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", outer)
    result = run_main(tiny(model="metadata_only", epochs=1), data_dir=str(synthetic_dir), n_boot=20, register=False)
    assert result["main_run_id"] == outer
    assert len({result["main_run_id"], result["split_run_id"], result["train_run_id"]}) == 3
    for key in ("split_run_id", "train_run_id"):
        assert client.get_run(result[key]).data.tags["mlflow.parentRunId"] == outer
    assert client.get_run(outer).data.tags[tracking.TAG_STEP] == "main"
