"""The ``main`` step: split -> train -> evaluate -> register, as one parent run with child runs.

Each step hands the next its run id. With ``reuse=True`` a step that already finished with
the same inputs and code (:func:`skinml.steps.reuse.find_finished_run`) is reused instead of
being run again. The parent run shows the dataset and the headline metrics of its training.
"""

from __future__ import annotations

import logging

import mlflow

from skinml import tracking
from skinml.data.source import resolve_data_dir
from skinml.inference import pick_device
from skinml.steps.reuse import find_finished_run
from skinml.training.recipe import Recipe

log = logging.getLogger(__name__)

#: Metrics of the training run copied to the parent row (the table the UI shows first).
HEADLINE_PREFIXES = ("test_", "best_val", "val_test_gap")
#: The recipes chosen on validation (README, "Recipes"): those whose runs may become champion.
#: ``default`` (Lite0 with mixup, the Quickstart's), ``default_v2`` (the previous default, without
#: mixup) and that recipe on Lite2 (at 260 and 224 px), ahead of it on the validation split (not
#: in the 5-fold cross-validation at 224 px: README, Results).
CHAMPION_RECIPES = ("default", "default_v2", "default_lite2", "default_lite2_224")


def run_main(recipe: Recipe, data_dir: str | None = None, seed: int = 42, split_seed: int = 42,
             split_strategy: str = "stratified", reuse: bool = False, register: bool = True,
             model_name: str | None = None, device: str = "auto", n_boot: int = 1000,
             experiment: str | None = None, val_fraction: float = 0.15, test_fraction: float = 0.15) -> dict:
    """Run the whole pipeline; returns the run ids of each step (and the registered version)."""
    from skinml.steps.evaluate import evaluate_run
    from skinml.steps.split import load_split, log_dataset_inputs, run_split, split_params
    from skinml.steps.train import train, training_params

    data_dir = str(resolve_data_dir(data_dir))  # resolve once: every step reads the same copy
    device = str(pick_device(device))  # "auto" is resolved, so reuse compares the device that ran
    result: dict = {}
    with tracking.start_run("main", experiment=experiment, run_name=f"main-{recipe.model}-{recipe.preset}") as parent:
        result["main_run_id"] = parent.info.run_id
        tracking.log_params({"model": recipe.model, "recipe": recipe.preset, "seed": seed, "data_dir": data_dir,
                             "split_seed": split_seed, "split_strategy": split_strategy, "reuse": reuse})

        wanted = split_params(data_dir, split_seed, split_strategy, val_fraction, test_fraction, False)
        found = find_finished_run("split", wanted) if reuse else None
        if found:
            split_id = found.info.run_id
            print(f"[main] reusing split run {split_id}")
        else:
            split_id = run_split(data_dir, seed=split_seed, strategy=split_strategy, val_fraction=val_fraction,
                                 test_fraction=test_fraction).run_id
        split_ref = load_split(split_id)
        result["split_run_id"] = split_id
        log_dataset_inputs(split_ref.manifest, data_dir)

        wanted = training_params(recipe, seed, split_ref.sha256, data_dir, device)
        found = find_finished_run("train", wanted, split_hash=split_ref.sha256) if reuse else None
        if found:
            train_id = found.info.run_id
            print(f"[main] reusing training run {train_id}")
        else:
            train_id = train(recipe, split=split_id, data_dir=data_dir, seed=seed, device=device).run_id
        result["train_run_id"] = train_id

        client = mlflow.MlflowClient()
        if reuse and "test_balanced_accuracy" in client.get_run(train_id).data.metrics:
            print(f"[main] reusing the evaluation already logged on {train_id}")
        else:
            evaluate_run(train_id, device=device, n_boot=n_boot)
        metrics = client.get_run(train_id).data.metrics
        mlflow.log_metrics({k: v for k, v in metrics.items() if k.startswith(HEADLINE_PREFIXES)})
        mlflow.set_tags({tracking.TAG_SPLIT_RUN: split_id, tracking.TAG_TRAIN_RUN: train_id,
                         tracking.TAG_MODEL: recipe.model, tracking.TAG_RECIPE: recipe.preset,
                         tracking.TAG_SPLIT_HASH: split_ref.sha256})

        if register:
            registered = _register(train_id, recipe, model_name)
            if registered is not None:
                result["registered"] = registered
    print(f"[main] done: {result}")
    return result


def _register(train_id: str, recipe: Recipe, model_name: str | None) -> dict | None:
    from skinml.steps.register import DEFAULT_MODEL_NAME, register_run

    family = mlflow.MlflowClient().get_run(train_id).data.tags.get(tracking.TAG_FAMILY)
    if family != "fusion":
        print(f"[main] not registering: {recipe.model} is a {family} model, only fusion models are served")
        return None
    # The same rule as `skinml register --recipe default`: only the validation-chosen recipes, as
    # chosen, compete for the champion alias; other recipes are registered for comparison.
    info = register_run(train_id, name=model_name or DEFAULT_MODEL_NAME, champion_recipe=CHAMPION_RECIPES)
    mlflow.set_tags({"skinml.registered_version": info["version"], "skinml.alias_moved": str(info["alias_moved"])})
    print(f"[main] registered {info['name']} version {info['version']}: {info['reason']}")
    return info
