"""Choosing and registering the champion.

1. :func:`select_best_run` ranks finished training runs (tag ``skinml.step=train``) of one
   model family (``fusion`` unless asked otherwise) by a stepless *validation* summary logged
   at the end of training (``best_val_bacc`` by default). Test metrics are never used to choose.
2. :func:`register_run` logs the pyfunc model (:mod:`skinml.serving.pyfunc_model`) in a new
   ``register`` run (tag ``skinml.step=register``, ``skinml.train_run_id`` = the training run,
   same experiment), so training runs stay as training left them, and registers it as a new
   version of one registered model. The alias ``champion`` moves to the new version only when
   it beats the current champion on the same metric, or when forced. Every version records its
   source run, validation and test metrics, split hash, backbone, weights and git commit as
   tags, plus a readable description. Stages are not used (deprecated).
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import logging
import math
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import skinml
from skinml import constants, inference, tracking
from skinml.data.image_config import DEFAULT_MAX_PIXELS
from skinml.serving import PYFUNC_MODEL_FILE
from skinml.serving import schema as serving_schema

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = constants.REGISTERED_MODEL_NAME
CHAMPION_ALIAS = constants.CHAMPION_ALIAS
DEFAULT_METRIC = constants.SELECTION_METRIC
DEFAULT_FAMILY = "fusion"
MODEL_ARTIFACT = "model"
#: Packages the served model imports, pinned to the versions installed when it is logged.
SERVING_PACKAGES = ("torch", "torchvision", "timm", "mlflow", "pandas", "numpy", "pillow", "scikit-learn", "captum")
#: uvicorn's compiled HTTP parser and event loop: `mlflow models serve` runs uvicorn, which picks
#: them when installed (else pure-Python h11 and asyncio, a few ms slower per request; README,
#: "Serving latency"). Pinned when installed (uvloop has no Windows build), so an environment
#: built from the model's requirements serves as fast as this one.
SERVER_PACKAGES = ("httptools", "uvloop")

# Tags recorded on every model version.
VTAG_TRAIN_RUN = tracking.TAG_TRAIN_RUN
VTAG_REGISTER_RUN = "skinml.register_run_id"
VTAG_METRIC = "skinml.selection_metric"
VTAG_VAL_PREFIX = "skinml.val."
VTAG_TEST_PREFIX = "skinml.test."
VTAG_DECISION = "skinml.champion_decision"


class RegistryError(ValueError):
    """No run to register, or a run that cannot be registered; the message says why."""


def greater_is_better(metric: str) -> bool:
    """Losses are minimised; every other validation summary (accuracy, bacc, AUC) is maximised."""
    return "loss" not in metric


def check_selection_metric(metric: str) -> str:
    """Only stepless validation summaries may choose a model: never the test split."""
    if metric.startswith("test_") or "_test_" in metric:
        raise RegistryError(f"'{metric}' is a test metric: the test split is never used to choose a model; "
                            f"rank by a validation summary such as {DEFAULT_METRIC} or best_val_loss")
    if not metric.startswith("best_val_"):
        raise RegistryError(f"rank by a stepless validation summary logged by training (best_val_bacc, "
                            f"best_val_loss, best_val_accuracy), got '{metric}'")
    return metric


def training_run_filter(family: str | None = DEFAULT_FAMILY, model: str | None = None,
                        recipe: str | None = None) -> str:
    """Search filter for finished training runs, optionally of one family, model and recipe."""
    clauses = [f"tags.\"{tracking.TAG_STEP}\" = 'train'", "attributes.status = 'FINISHED'"]
    if family:
        clauses.append(f"tags.\"{tracking.TAG_FAMILY}\" = '{family}'")
    if model:
        clauses.append(f"tags.\"{tracking.TAG_MODEL}\" = '{model}'")
    if recipe:
        clauses.append(f"tags.\"{tracking.TAG_RECIPE}\" = '{recipe}'")
    return " and ".join(clauses)


def _metric(run: Run, metric: str) -> float | None:
    value = run.data.metrics.get(metric)
    return float(value) if value is not None and math.isfinite(value) else None


def candidate_runs(
    metric: str = DEFAULT_METRIC,
    family: str | None = DEFAULT_FAMILY,
    model: str | None = None,
    experiment_ids: list[str] | None = None,
    recipe: str | None = None,
) -> list[Run]:
    """Finished training runs with a finite ``metric``, best first.

    Ties go to the lower validation loss, then to the newer run, so the choice is stable.
    """
    check_selection_metric(metric)
    tracking.setup_tracking()
    client = MlflowClient()
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(experiment_ids, training_run_filter(family, model, recipe), max_results=1000,
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    runs = [r for r in runs if _metric(r, metric) is not None]
    if recipe:  # the recipe as chosen, not an ablation that overrode part of it
        runs = [r for r in runs if not r.data.tags.get(tracking.TAG_RECIPE_OVERRIDES)]
    sign = -1.0 if greater_is_better(metric) else 1.0

    def rank(run: Run):
        loss = _metric(run, "best_val_loss")
        return (sign * _metric(run, metric), loss if loss is not None else math.inf, -run.info.start_time)

    return sorted(runs, key=rank)


def _has_checkpoint(client: MlflowClient, run_id: str) -> bool:
    folder = inference.BEST.rpartition("/")[0]
    return any(a.path == inference.BEST for a in client.list_artifacts(run_id, folder))


def select_best_run(
    metric: str = DEFAULT_METRIC,
    family: str | None = DEFAULT_FAMILY,
    model: str | None = None,
    experiment_ids: list[str] | None = None,
    recipe: str | None = None,
) -> Run:
    """The best finished training run of ``family`` (and ``model``) by ``metric`` that has a
    ``checkpoints/best.pt``. Raises :class:`RegistryError` when there is none."""
    client = MlflowClient()
    for run in candidate_runs(metric, family, model, experiment_ids, recipe):
        if _has_checkpoint(client, run.info.run_id):
            return run
        log.warning("skipping training run %s: it has no %s", run.info.run_id, inference.BEST)
    what = " ".join(x for x in (family, model, recipe and f"recipe={recipe}") if x) or "any"
    raise RegistryError(f"no finished {what} training run with a finite {metric} and a {inference.BEST} "
                        f"was found in the tracking store {mlflow.get_tracking_uri()}; train one first "
                        "(skinml train) or pass a run id")


# -- logging the pyfunc model -------------------------------------------------------------


def pip_requirements() -> list[str]:
    """Exact pins of the packages the served model imports, as installed now."""
    pins = []
    for package in SERVING_PACKAGES + SERVER_PACKAGES:
        try:
            version = importlib.metadata.version(package).split("+")[0]  # drop local tags such as +cpu
        except importlib.metadata.PackageNotFoundError:
            if package in SERVER_PACKAGES:
                continue
            raise
        pins.append(f"{package}=={version}")
    return pins


def _copy_package(destination: Path) -> Path:
    """A clean copy of the skinml package (no caches) to ship as ``code_paths``."""
    source = Path(skinml.__file__).resolve().parent
    target = destination / "skinml"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo"))
    return target


def log_pyfunc_model(train_run_id: str, limits: serving_schema.ServingLimits | None = None,
                     name: str = MODEL_ARTIFACT):
    """Log the serving model built from ``train_run_id``'s best checkpoint in the active run.

    Returns MLflow's ``ModelInfo``. The checkpoint is rebuilt here once, so a broken one fails
    now rather than in the server.
    """
    limits = limits or serving_schema.ServingLimits()
    with tempfile.TemporaryDirectory(prefix="skinml-register-") as tmp:
        tmp = Path(tmp)
        checkpoint = tracking.download_artifact(train_run_id, inference.BEST, tmp / "download")
        state = inference.load_checkpoint(checkpoint)
        bundle = inference.build_inference_bundle(state)
        files = {
            "checkpoint": checkpoint,
            "preprocessor": bundle.preprocessor.save(tmp / "preprocessor.json"),
            "labels": tmp / "labels.json",
            "image_config": tmp / "image_config.json",
        }
        files["labels"].write_text(json.dumps(bundle.labels))
        files["image_config"].write_text(json.dumps(bundle.image_config.to_dict() if bundle.image_config else None))
        code = _copy_package(tmp / "code")
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(PYFUNC_MODEL_FILE),
            artifacts={key: str(path) for key, path in files.items()},
            code_paths=[str(code)],
            signature=serving_schema.model_signature(bundle.preprocessor, bundle.uses_images, bundle.labels),
            input_example=serving_schema.input_example(bundle.preprocessor),
            pip_requirements=pip_requirements(),
            model_config=limits.to_dict(),
            metadata={"skinml": {"train_run_id": train_run_id, "model": inference.model_name(state),
                                 "labels": bundle.labels, "weights_source": bundle.weights_source}},
        )


# -- registering and the champion alias ---------------------------------------------------


def champion_version(name: str = DEFAULT_MODEL_NAME, client: MlflowClient | None = None):
    """The version holding the ``champion`` alias, or None."""
    client = client or MlflowClient()
    try:
        return client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException:
        return None


def version_metric(version, metric: str, client: MlflowClient | None = None) -> float | None:
    """``metric`` of a version: its tag, else its training run's metric."""
    tag = version.tags.get(VTAG_VAL_PREFIX + metric)
    if tag not in (None, ""):
        value = float(tag)
        return value if math.isfinite(value) else None
    run_id = version.tags.get(VTAG_TRAIN_RUN)
    if not run_id:
        return None
    try:
        return _metric((client or MlflowClient()).get_run(run_id), metric)
    except MlflowException:
        return None


def champion_decision(value: float, metric: str, champion, champion_value: float | None,
                      force: bool = False) -> tuple[bool, str]:
    """Whether the alias moves to a new version scoring ``value``, and why (one line)."""
    if force:
        return True, "forced"
    if champion is None:
        return True, "no champion yet"
    if champion_value is None:
        return False, (f"champion v{champion.version} has no {metric} to compare with; "
                       f"champion stays v{champion.version} (force to replace it)")
    better = value > champion_value if greater_is_better(metric) else value < champion_value
    if better:
        return True, f"{metric} {value:.4f} beats champion v{champion.version}'s {champion_value:.4f}"
    return False, (f"{metric} {value:.4f} does not beat champion v{champion.version}'s {champion_value:.4f}; "
                   f"champion stays v{champion.version}")


def _existing_version(client: MlflowClient, name: str, run_id: str):
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    same = [v for v in versions if v.tags.get(VTAG_TRAIN_RUN) == run_id]
    return max(same, key=lambda v: int(v.version)) if same else None


def _version_tags(run: Run, metric: str, register_run_id: str, limits: serving_schema.ServingLimits) -> dict[str, str]:
    data = run.data
    tags = {
        VTAG_TRAIN_RUN: run.info.run_id,
        VTAG_REGISTER_RUN: register_run_id,
        VTAG_METRIC: metric,
        tracking.TAG_MODEL: data.tags.get(tracking.TAG_MODEL, data.params.get("resolved.model", data.params.get("model", "unknown"))),
        tracking.TAG_FAMILY: data.tags.get(tracking.TAG_FAMILY, "unknown"),
        tracking.TAG_RECIPE: data.tags.get(tracking.TAG_RECIPE, "unknown"),
        tracking.TAG_SPLIT_HASH: (data.params.get("split_manifest_sha256")
                                  or data.tags.get(tracking.TAG_SPLIT_HASH, "unknown")),
        "skinml.backbone": data.params.get("resolved.backbone", data.params.get("backbone", "unknown")),
        "skinml.weights_source": data.params.get("resolved.weights_source", data.params.get("weights_source", "unknown")),
        "skinml.git_commit": data.tags.get("skinml.git_commit") or data.tags.get("mlflow.source.git.commit", "unknown"),
        "skinml.git_dirty": data.tags.get("skinml.git_dirty", "unknown"),
        "skinml.max_pixels": str(limits.max_pixels),
    }
    serving_commit = tracking.git_tags().get("skinml.git_commit")
    if serving_commit:
        tags["skinml.serving_code_commit"] = serving_commit
    for key, value in sorted(data.metrics.items()):
        if key.startswith("best_val_") or key == "best_epoch":
            tags[VTAG_VAL_PREFIX + key] = repr(float(value))
        elif key.startswith("test_"):
            tags[VTAG_TEST_PREFIX + key] = repr(float(value))
    if not any(k.startswith(VTAG_TEST_PREFIX) for k in tags):
        tags["skinml.test_evaluated"] = "false"
    return tags


def _description(name: str, version: str, run: Run, tags: dict[str, str], metric: str, moved: bool, reason: str) -> str:
    def metric_line(prefix: str) -> str:
        items = [f"{k[len(prefix):]}={float(v):.4g}" for k, v in tags.items() if k.startswith(prefix)]
        return ", ".join(items) or "not evaluated yet"

    return "\n".join([
        f"{tags[tracking.TAG_MODEL]} ({tags[tracking.TAG_FAMILY]}), backbone {tags['skinml.backbone']} with "
        f"{tags['skinml.weights_source']} weights, recipe {tags[tracking.TAG_RECIPE]}.",
        f"Trained in run {run.info.run_id} ({run.info.run_name}) on split {tags[tracking.TAG_SPLIT_HASH][:12]}, "
        f"git commit {tags['skinml.git_commit'][:12]}.",
        f"Chosen by {metric} (validation). Validation: {metric_line(VTAG_VAL_PREFIX)}.",
        f"Test: {metric_line(VTAG_TEST_PREFIX)}.",
        f"Alias '{CHAMPION_ALIAS}': {'moved to v' + version if moved else 'not moved'} ({reason}).",
        f"Registered {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC by `skinml register`; serve with "
        f"`mlflow models serve -m \"models:/{name}@{CHAMPION_ALIAS}\" --env-manager local`.",
    ])


def _not_champion_material(run: Run, champion_recipe: str | Sequence[str] | None) -> str | None:
    """Why ``run`` may be registered but must not take the alias (None: it may).

    ``champion_recipe``: the recipe (or recipes) chosen on validation; None lets any run compete.
    """
    if not champion_recipe:
        return None
    chosen = (champion_recipe,) if isinstance(champion_recipe, str) else tuple(champion_recipe)
    recipe = run.data.tags.get(tracking.TAG_RECIPE)
    overrides = run.data.tags.get(tracking.TAG_RECIPE_OVERRIDES)
    if recipe not in chosen:
        named = repr(chosen[0]) if len(chosen) == 1 else "one of " + ", ".join(repr(c) for c in chosen)
        return f"recipe {recipe!r} is not the validation-chosen {named}: registered, champion unchanged"
    if overrides:
        return (f"recipe {recipe!r} with overrides ({overrides}) is not the validation-chosen recipe: registered, "
                "champion unchanged")
    return None


def _reuse_version(client: MlflowClient, name: str, existing, run_id: str, metric: str, value: float,
                   ineligible: str | None = None) -> dict[str, Any]:
    """The run already has a version: register nothing, but still give it the alias if it wins."""
    version = str(existing.version)
    champion = champion_version(name, client)
    if champion is not None and str(champion.version) == version:
        moved, reason = False, f"run {run_id} is already version {version}, the champion"
    else:
        champion_value = version_metric(champion, metric, client) if champion is not None else None
        moved, reason = champion_decision(value, metric, champion, champion_value)
        if ineligible:
            moved, reason = False, ineligible
        if moved:
            client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
            client.set_model_version_tag(name, version, VTAG_DECISION, reason)
        reason = f"run {run_id} is already version {version}; nothing logged (force to register it again); {reason}"
    now_champion = champion_version(name, client)
    return {
        "name": name, "version": version, "run_id": run_id, "register_run_id": existing.tags.get(VTAG_REGISTER_RUN),
        "model_uri": f"models:/{name}/{version}", "metric": metric, "value": value, "alias_moved": moved,
        "champion_version": str(now_champion.version) if now_champion else None, "reason": reason,
        "registered": False,
    }


def register_run(
    run_id: str,
    name: str = DEFAULT_MODEL_NAME,
    metric: str = DEFAULT_METRIC,
    force: bool = False,
    pixel_limit: int = DEFAULT_MAX_PIXELS,
    limits: serving_schema.ServingLimits | None = None,
    champion_recipe: str | Sequence[str] | None = None,
) -> dict[str, Any]:
    """Log ``run_id``'s model, register it as a new version of ``name`` and maybe move the alias.

    The pyfunc model is logged in a new ``register`` run (under ``mlflow run``, the run MLflow
    started) in the training run's experiment. A run that already has a version of ``name`` is
    not registered again unless ``force``. With ``champion_recipe`` only a run of that recipe
    (or of one of those recipes), without overrides, may take the alias (others are registered, the champion stays). Returns ``{name, version, run_id, register_run_id,
    model_uri, metric, value, alias_moved, champion_version, reason, registered}``.
    """
    check_selection_metric(metric)
    tracking.setup_tracking()
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise RegistryError(f"run '{run_id}' was not found in {mlflow.get_tracking_uri()}") from exc
    step = run.data.tags.get(tracking.TAG_STEP)
    if step != "train":
        raise RegistryError(f"run {run_id} is not a training run ({tracking.TAG_STEP}={step!r})")
    if run.info.status != "FINISHED":
        raise RegistryError(f"training run {run_id} is {run.info.status}, not FINISHED")
    value = _metric(run, metric)
    if value is None:
        raise RegistryError(f"training run {run_id} has no finite {metric}")
    if not _has_checkpoint(client, run_id):
        raise RegistryError(f"training run {run_id} has no {inference.BEST}")
    limits = limits or serving_schema.ServingLimits(max_pixels=int(pixel_limit))
    ineligible = _not_champion_material(run, champion_recipe)

    existing = _existing_version(client, name, run_id)
    if existing is not None and not force:
        return _reuse_version(client, name, existing, run_id, metric, value, ineligible)

    experiment = client.get_experiment(run.info.experiment_id).name
    register_tags = {tracking.TAG_TRAIN_RUN: run_id,
                     tracking.TAG_MODEL: run.data.tags.get(tracking.TAG_MODEL, ""),
                     tracking.TAG_FAMILY: run.data.tags.get(tracking.TAG_FAMILY, ""),
                     tracking.TAG_SPLIT_HASH: run.data.tags.get(tracking.TAG_SPLIT_HASH, "")}
    with tracking.start_run("register", experiment=experiment, run_name=f"register-{name}",
                            tags=register_tags) as register:
        register_run_id = register.info.run_id
        tracking.log_params({"registered_model_name": name, "selection_metric": metric, "train_run_id": run_id,
                             "force": force, **{f"limit.{k}": v for k, v in limits.to_dict().items()}})
        info = log_pyfunc_model(run_id, limits)
        version = str(mlflow.register_model(info.model_uri, name).version)

        tags = _version_tags(run, metric, register_run_id, limits)
        champion = champion_version(name, client)
        champion_value = version_metric(champion, metric, client) if champion is not None else None
        moved, reason = champion_decision(value, metric, champion, champion_value, force)
        if ineligible and not force:
            moved, reason = False, ineligible
        for key, tag_value in {**tags, VTAG_DECISION: reason}.items():
            client.set_model_version_tag(name, version, key, tag_value)
        client.update_model_version(name, version, description=_description(name, version, run, tags, metric,
                                                                              moved, reason))
        if moved:
            client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
        if not client.get_registered_model(name).description:
            client.update_registered_model(name, description=(
                "Skin-lesion diagnosis (ACK, BCC, MEL, NEV, SCC, SEK) from a clinical photo and patient metadata, "
                f"trained on PAD-UFES-20. The alias '{CHAMPION_ALIAS}' marks the version to serve."))
        mlflow.set_tags({"skinml.registered_model": name, "skinml.registered_version": str(version),
                         "skinml.alias_moved": str(moved), VTAG_DECISION: reason})
    now_champion = champion_version(name, client)
    log.info("registered %s v%s from run %s: %s", name, version, run_id, reason)
    return {
        "name": name, "version": str(version), "run_id": run_id, "register_run_id": register_run_id,
        "model_uri": f"models:/{name}/{version}", "metric": metric, "value": value, "alias_moved": moved,
        "champion_version": str(now_champion.version) if now_champion else None, "reason": reason,
        "registered": True,
    }


def register_best(
    name: str = DEFAULT_MODEL_NAME,
    metric: str = DEFAULT_METRIC,
    family: str | None = DEFAULT_FAMILY,
    model: str | None = None,
    run_id: str | None = None,
    experiment_ids: list[str] | None = None,
    force: bool = False,
    pixel_limit: int = DEFAULT_MAX_PIXELS,
    recipe: str | None = None,
) -> dict[str, Any]:
    """``register_run`` on ``run_id``, or on the best run :func:`select_best_run` finds."""
    if run_id is None:
        run_id = select_best_run(metric, family, model, experiment_ids, recipe).info.run_id
        log.info("best %s training run by %s: %s", family or "any", metric, run_id)
    return register_run(run_id, name=name, metric=metric, force=force, pixel_limit=pixel_limit, champion_recipe=recipe)
