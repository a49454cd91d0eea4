"""The main job: split -> train -> evaluate -> register, as one parent run with child runs.

Each step hands the next its run id. With ``reuse=True`` a step that already finished with
the same inputs is found in the store and reused instead of being run again.
"""

from __future__ import annotations

import logging

import mlflow

from skinml import tracking
from skinml.data.source import resolve_data_dir
from skinml.training.recipe import Recipe

log = logging.getLogger(__name__)


def _find_finished(query: str) -> mlflow.entities.Run | None:
    client = mlflow.MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"{query} and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def _reusable_split(data_dir: str, seed: int, strategy: str) -> str | None:
    run = _find_finished(f"tags.`{tracking.TAG_STEP}` = 'split' and params.seed = '{seed}' "
                         f"and params.strategy = '{strategy}'")
    if run is None:
        return None
    recorded = tracking.run_param(run, "data_dir")
    return run.info.run_id if recorded == data_dir else None


def _reusable_training(recipe: Recipe, seed: int, split_hash: str) -> str | None:
    """A finished training run with the same resolved recipe, seed and split."""
    client = mlflow.MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    query = (f"tags.`{tracking.TAG_STEP}` = 'train' and attributes.status = 'FINISHED' "
             f"and tags.`{tracking.TAG_SPLIT_HASH}` = '{split_hash}'")
    wanted = {f"recipe.{k}": tracking.param_text(v) for k, v in recipe.flat().items()}
    for run in client.search_runs(experiments, query, order_by=["attributes.start_time DESC"]):
        if tracking.run_param(run, "seed") != str(seed):
            continue
        if all(tracking.run_param(run, k) == v for k, v in wanted.items() if k != "recipe.preset"):
            return run.info.run_id
    return None


def run_main(recipe: Recipe, data_dir: str | None = None, seed: int = 42, split_seed: int = 42,
             split_strategy: str = "stratified", reuse: bool = False, register: bool = True,
             model_name: str | None = None, device: str = "auto", n_boot: int = 1000,
             experiment: str | None = None) -> dict:
    """Run the whole pipeline; returns the run ids of each step (and the registered version)."""
    from skinml.evaluation.report import evaluate_run
    from skinml.pipeline import load_split, run_split
    from skinml.training.run import train

    data_dir = str(resolve_data_dir(data_dir))  # resolve once: every step reads the same copy
    result: dict = {}
    with tracking.start_run("main", experiment=experiment, run_name=f"main-{recipe.model}") as parent:
        result["main_run_id"] = parent.info.run_id
        tracking.log_params({"model": recipe.model, "recipe": recipe.preset, "seed": seed, "data_dir": data_dir,
                             "split_seed": split_seed, "split_strategy": split_strategy, "reuse": reuse})

        split_id = _reusable_split(data_dir, split_seed, split_strategy) if reuse else None
        if split_id:
            print(f"[main] reusing split run {split_id}")
        else:
            split_id = run_split(data_dir, seed=split_seed, strategy=split_strategy).run_id
        split_ref = load_split(split_id)
        result["split_run_id"] = split_id

        train_id = _reusable_training(recipe, seed, split_ref.sha256) if reuse else None
        if train_id:
            print(f"[main] reusing training run {train_id}")
        else:
            train_id = train(recipe, split=split_id, data_dir=data_dir, seed=seed, device=device).run_id
        result["train_run_id"] = train_id

        metrics = mlflow.MlflowClient().get_run(train_id).data.metrics
        if reuse and "test_balanced_accuracy" in metrics:
            print(f"[main] reusing the evaluation already logged on {train_id}")
        else:
            evaluate_run(train_id, device=device, n_boot=n_boot)
        metrics = mlflow.MlflowClient().get_run(train_id).data.metrics
        mlflow.log_metrics({k: v for k, v in metrics.items() if k.startswith(("test_", "best_val"))})
        mlflow.set_tags({tracking.TAG_SPLIT_RUN: split_id, tracking.TAG_TRAIN_RUN: train_id})

        if register:
            from skinml.registry import DEFAULT_MODEL_NAME, register_run

            family = mlflow.MlflowClient().get_run(train_id).data.tags.get(tracking.TAG_FAMILY)
            if family != "fusion":
                print(f"[main] not registering: {recipe.model} is a {family} model, only fusion models are served")
            else:
                info = register_run(train_id, name=model_name or DEFAULT_MODEL_NAME)
                result["registered"] = info
                mlflow.set_tags({"skinml.registered_version": info["version"],
                                 "skinml.alias_moved": str(info["alias_moved"])})
                print(f"[main] registered {info['name']} version {info['version']}: {info['reason']}")
    print(f"[main] done: {result}")
    return result
