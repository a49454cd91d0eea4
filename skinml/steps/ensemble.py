"""An ensemble of finished training runs (and/or flip test-time augmentation) as one run.

``skinml ensemble --runs A,B,C [--tta flips]`` writes one checkpoint holding every member
(:func:`skinml.inference.ensemble_state`; scoring averages their probabilities) to a new run that
evaluation, comparison and the registry treat like a training run: tag ``skinml.step=train``,
the members' model, family, recipe and split tags, the tag ``skinml.ensemble_of`` naming the
members, and the same stepless validation summaries training logs (``best_val_bacc``,
``best_val_accuracy``, ``best_val_loss``: the members' training criterion on the averaged
probabilities), computed on the split's validation rows. So ``skinml register`` makes it the
champion only if validation says it beats the current one, by the same rule as any run.

Members must be finished training runs on one split, of one model and one recipe configuration
(the seed may differ), each with its selected checkpoint.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch

from skinml import inference, tracking
from skinml.data import schema
from skinml.evaluation.metrics import compute_metrics
from skinml.training.imbalance import make_loss
from skinml.training.recipe import Recipe

TAG_ENSEMBLE_OF = "skinml.ensemble_of"
TAG_TTA = "skinml.tta"
#: Recipe parameters that may differ between members (everything else must match).
_FREE_PARAMS = {"seed", "device", "num_workers", "torch_version"}


@dataclass
class EnsembleResult:
    run_id: str
    members: list[str]
    tta: str
    val_metrics: dict[str, float]


def _check_members(runs) -> None:
    first = runs[0]
    for run in runs:
        rid = run.info.run_id
        if run.data.tags.get(tracking.TAG_STEP) != "train" or run.info.status != "FINISHED":
            raise ValueError(f"run {rid} is not a finished training run "
                             f"({tracking.TAG_STEP}={run.data.tags.get(tracking.TAG_STEP)!r}, {run.info.status})")
        if run.data.tags.get(TAG_ENSEMBLE_OF):
            raise ValueError(f"run {rid} is itself an ensemble; list its members instead")
        for tag in (tracking.TAG_SPLIT_HASH, tracking.TAG_MODEL):
            if run.data.tags.get(tag) != first.data.tags.get(tag):
                raise ValueError(f"run {rid} has {tag}={run.data.tags.get(tag)!r}, run {first.info.run_id} has "
                                 f"{first.data.tags.get(tag)!r}: an ensemble needs one split and one model")
        for key, value in first.data.params.items():
            if key.startswith("recipe.") and run.data.params.get(key) != value:
                raise ValueError(f"run {rid} has {key}={run.data.params.get(key)!r}, run {first.info.run_id} has "
                                 f"{value!r}: members differ only in their seed")


def build_ensemble(run_ids: list[str], tta: str = "none", data_dir: str | None = None, device: str = "cpu",
                   run_name: str | None = None, batch_size: int = 64, view: str | None = None) -> EnsembleResult:
    """Average ``run_ids``' selected checkpoints (with flips if ``tta="flips"``) into one new run.

    ``view`` ("squash"/"crop") scores the photos another way than the members were validated with
    (as ``skinml evaluate --view``); the ensemble keeps it for evaluation and serving.
    """
    from skinml.steps.split import run_frame

    run_ids = list(dict.fromkeys(r.strip() for r in run_ids if r.strip()))
    if not run_ids:
        raise ValueError("name at least one training run (two or more for an ensemble)")
    if len(run_ids) == 1 and tta == "none":
        raise ValueError("one run without test-time augmentation is that run itself; add runs or --tta flips")
    if tta not in inference.TTA_CHOICES:
        raise ValueError(f"tta must be one of {inference.TTA_CHOICES}, got {tta!r}")
    tracking.setup_tracking()
    runs = [tracking.get_run(r) for r in run_ids]
    _check_members(runs)
    first = runs[0]
    states = [inference.load_checkpoint(tracking.download_artifact(r, inference.BEST)) for r in run_ids]
    state = inference.ensemble_state(states, tta, sources=[f"run {r}" for r in run_ids])
    if view is not None and state.get("image_config"):
        from skinml.constants import EVAL_VIEWS

        if view not in EVAL_VIEWS:
            raise ValueError(f"view must be one of {EVAL_VIEWS}, got {view!r}")
        train_resize = int(float(tracking.run_param(runs[0], "augment.resize") or 0))
        state["image_config"] = {**state["image_config"], "resize": train_resize if view == "crop" else 0}
    bundle = inference.build_inference_bundle(state)

    frame = run_frame(first, data_dir)
    val = frame[frame["split"] == "val"].reset_index(drop=True)
    train_labels = frame.loc[frame["split"] == "train", schema.TARGET].map(schema.LABEL_TO_INDEX).to_numpy()
    y = val[schema.TARGET].map(schema.LABEL_TO_INDEX).to_numpy()
    proba = inference.score_frame(bundle, val, inference.pick_device(device), batch_size)

    recipe = Recipe.from_dict(json.loads(tracking.download_artifact(first.info.run_id, "recipe.json").read_text()))
    criterion = make_loss(train_labels, recipe.imbalance, recipe.label_smoothing)
    log_proba = torch.log(torch.as_tensor(proba, dtype=torch.float32).clamp_min(torch.finfo(torch.float32).tiny))
    val_loss = float(criterion(log_proba, torch.tensor(y, dtype=torch.long)))
    metrics = compute_metrics(y, proba)
    summary = {"best_val_bacc": float(metrics["balanced_accuracy"]), "best_val_accuracy": float(metrics["accuracy"]),
               "best_val_loss": val_loss, "ensemble_size": float(len(run_ids))}

    seeds = [tracking.run_param(r, "seed") for r in runs]
    tags = {key: first.data.tags.get(key, "") for key in (
        tracking.TAG_MODEL, tracking.TAG_FAMILY, tracking.TAG_RECIPE, tracking.TAG_SPLIT_HASH, tracking.TAG_SPLIT_RUN,
        tracking.TAG_RECIPE_OVERRIDES)}
    tags.update({TAG_ENSEMBLE_OF: ",".join(run_ids), TAG_TTA: tta})
    if view is not None:
        tags["skinml.view"] = view
    params = {k: v for k, v in first.data.params.items() if k not in _FREE_PARAMS}
    params.update(seed=f"ensemble:{','.join(str(s) for s in seeds)}", tta=tta, ensemble_members=",".join(run_ids),
                  view=view or "as trained")
    experiment = mlflow.MlflowClient().get_experiment(first.info.experiment_id).name
    name = run_name or f"{first.data.tags.get(tracking.TAG_MODEL, 'model')}-ensemble{len(run_ids)}" + (
        "-flips" if tta == "flips" else "") + (f"-{view}" if view else "")
    with tracking.start_run("train", experiment=experiment, run_name=name, tags=tags) as run:
        tracking.log_params(params)
        mlflow.log_metrics(summary)
        with tempfile.TemporaryDirectory() as tmp:
            saved = inference.save_checkpoint(state, Path(tmp) / "best.pt")
            mlflow.log_artifact(str(saved), "checkpoints")
            for artifact in ("recipe.json", "preprocessor.json", "labels.json"):
                mlflow.log_artifact(str(tracking.download_artifact(first.info.run_id, artifact, Path(tmp) / "m")))
            (Path(tmp) / "ensemble.json").write_text(json.dumps({
                "members": run_ids, "seeds": seeds, "tta": tta,
                "member_best_val_bacc": [r.data.metrics.get("best_val_bacc") for r in runs],
                "val": {k: v for k, v in summary.items()}}, indent=2))
            mlflow.log_artifact(str(Path(tmp) / "ensemble.json"))
        run_id = run.info.run_id
    print(f"ensemble run {run_id}: {len(run_ids)} member(s), tta={tta}, validation balanced accuracy "
          f"{summary['best_val_bacc']:.3f} (members: "
          + ", ".join(f"{r.data.metrics.get('best_val_bacc', float('nan')):.3f}" for r in runs) + ")")
    return EnsembleResult(run_id, run_ids, tta, summary)

