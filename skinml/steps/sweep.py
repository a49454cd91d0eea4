"""A hyperparameter sweep with Optuna, every trial a child run of one MLflow parent run.

``skinml sweep --study NAME --trials N`` searches what the original design planned to tune (the
metadata MLP width, the fusion head's width, dropouts, both learning rates, questionnaire
dropout; heads and projection size for ``spatial_fusion``) with Optuna's TPE sampler and a
median pruner fed each epoch's validation balanced accuracy. The objective is the trial's
``best_val_bacc`` (validation balanced accuracy at the epoch training selects): the test split
plays no part.

**Resumable from the store.** The Optuna study lives in an RDB storage (``optuna.db`` beside
``mlflow.db``, or ``--storage``); the MLflow parent run is found again by its tag
``skinml.sweep_study``. Running the same command again continues the same study under the same
parent until ``N`` trials have finished (completed or pruned); a trial left RUNNING by a killed
process is marked FAIL (its child run stays as it was left) and does not count.

**Parallel trials.** ``--parallel N`` runs N worker processes on the same study (Optuna's
storage is the rendezvous; TPE with the constant liar, a sampler seed per worker, so workers
do not propose the same point). Counting the trials and taking one is serialised by a lock
file, so the workers together never take more trials than ``--trials``. One launcher per study
at a time: a new launcher marks the RUNNING trials it finds as FAIL. Meant for a GPU that one small-budget training leaves idle;
on a CPU the workers split the cores (``torch`` threads = cores / N).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from skinml import tracking
from skinml.training.recipe import Recipe

log = logging.getLogger("skinml.steps.sweep")  # by name: worker processes run this module as __main__

TAG_STUDY = "skinml.sweep_study"
TAG_TRIAL = "skinml.sweep_trial"
TAG_PRUNED = "skinml.pruned"
TAG_BASELINE = "skinml.sweep_baseline"


@dataclass
class SweepResult:
    study_name: str
    parent_run_id: str
    best_value: float | None
    best_params: dict[str, Any]
    best_run_id: str | None
    n_complete: int
    n_pruned: int
    n_failed: int
    baseline_value: float | None = None  # the recipe's own values, trial 0 (None: not run or pruned)


def default_storage() -> str:
    return f"sqlite:///{tracking.project_root() / 'optuna.db'}"


@dataclass(frozen=True)
class Param:
    """One dimension of the search space: a recipe field, or a model option (``option=True``)."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple | None = None
    option: bool = False
    models: tuple[str, ...] | None = None  # None: every model

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def contains(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        return isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high


#: What the original design planned to tune, with ranges around the default recipe's values.
SPACE: tuple[Param, ...] = (
    Param("lr_backbone", 3e-5, 3e-4, log=True),
    Param("lr_head", 3e-4, 3e-3, log=True),
    Param("questionnaire_dropout", 0.0, 0.7),
    Param("head_dropout", 0.2, 0.6, option=True),
    Param("metadata_dropout", 0.1, 0.5, option=True, models=("cnn_fusion", "metadata_only")),
    Param("metadata_dim", choices=(32, 64, 128), option=True, models=("cnn_fusion",)),
    Param("head_dim", choices=(128, 256, 512), option=True, models=("cnn_fusion",)),
    Param("num_heads", choices=(4, 8), option=True, models=("spatial_fusion",)),
    Param("proj_dim", choices=(256, 512), option=True, models=("spatial_fusion",)),
    Param("attn_dropout", 0.0, 0.3, option=True, models=("spatial_fusion",)),
)


def space_for(model: str) -> tuple[Param, ...]:
    return tuple(p for p in SPACE if p.models is None or model in p.models)


def suggest(trial, model: str) -> dict[str, Any]:
    """One point of the search space, as recipe fields (``model_options`` for the model's own)."""
    fields: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for param in space_for(model):
        (options if param.option else fields)[param.name] = param.suggest(trial)
    fields["model_options"] = options
    return fields


def baseline_params(base: Recipe) -> dict[str, Any] | None:
    """The recipe's own values in the search space's terms (model options fall back to the
    model's defaults), or None when one of them lies outside the space."""
    from skinml.models.registry import model_options

    defaults = {**model_options(base.model), **base.model_options}
    space = space_for(base.model)
    params = {p.name: (defaults[p.name] if p.option else getattr(base, p.name)) for p in space}
    outside = {p.name: params[p.name] for p in space if not p.contains(params[p.name])}
    if outside:
        log.warning("the recipe's own values %s lie outside the sweep's space: no baseline trial", outside)
        return None
    return params


def _parent_run(study_name: str, experiment: str | None) -> mlflow.ActiveRun:
    """The sweep's parent run: the one already tagged with this study, else a new one."""
    tracking.setup_tracking()
    client = mlflow.MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(experiments, f"tags.`{TAG_STUDY}` = '{study_name}' and tags.`{tracking.TAG_STEP}` = 'sweep'",
                               order_by=["attributes.start_time ASC"], max_results=1)
    if found:
        log.info("continuing sweep %s in its parent run %s", study_name, found[0].info.run_id)
        return mlflow.start_run(run_id=found[0].info.run_id)
    return tracking.start_run("sweep", experiment=experiment, run_name=f"sweep-{study_name}",
                              tags={TAG_STUDY: study_name})


def _fail_stale_trials(study, storage) -> int:
    """Trials a killed process left RUNNING can never finish: mark them FAIL."""
    from optuna.trial import TrialState

    stale = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    for trial in stale:
        storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)  # noqa: SLF001 (storage API takes the id)
    return len(stale)


def run_sweep(base: Recipe, study_name: str, n_trials: int, split: str | None = None, data_dir: str | None = None,
              seed: int = 42, storage: str | None = None, sampler_seed: int = 0, prune: bool = True,
              experiment: str | None = None, device: str = "auto", num_workers: int | None = None,
              baseline: bool = True, parallel: int = 1, logs: str | Path = "outputs/sweep") -> SweepResult:
    """Run (or continue) the study until ``n_trials`` trials have completed or been pruned.

    With ``baseline`` a new study's first trial is the recipe itself (:func:`baseline_params`),
    trained under the same budget and seed as the others, so the study shows whether any
    proposal beat it; the sampler then learns from it like from any other trial. With
    ``parallel`` > 1 the trials run in that many worker processes (their output in
    ``logs/<study>-worker-<i>.log``).
    """
    import optuna
    from optuna.trial import TrialState

    from skinml.steps.train import resolve_split

    if n_trials < 1:
        raise ValueError(f"n_trials must be at least 1, got {n_trials}")
    if parallel < 1:
        raise ValueError(f"parallel must be at least 1, got {parallel}")
    tracking.setup_tracking()
    split_ref = resolve_split(split, data_dir)  # one split for every trial
    spec = WorkerSpec(recipe=base.to_dict(), study_name=study_name, n_trials=n_trials,
                      split=split_ref.run_id or split_ref.source, data_dir=data_dir, seed=seed,
                      storage=storage or default_storage(), sampler_seed=sampler_seed, prune=prune, device=device,
                      num_workers=num_workers, constant_liar=parallel > 1)
    storage_obj = optuna.storages.RDBStorage(spec.storage)
    study = _load_study(spec, storage_obj)
    if baseline and not study.get_trials(deepcopy=False):
        params = baseline_params(base)
        if params is not None:
            study.enqueue_trial(params, user_attrs={"baseline": True})
    stale = _fail_stale_trials(study, storage_obj)
    if stale:
        log.warning("sweep %s: %d trial(s) left RUNNING by an interrupted process marked FAIL", study_name, stale)

    with _parent_run(study_name, experiment) as parent:
        parent_id = parent.info.run_id
        params = {"study_name": study_name, "sampler": "TPESampler", "sampler_seed": sampler_seed,
                  "pruner": "MedianPruner" if prune else "none", "objective": "best_val_bacc (maximize)",
                  "model": base.model, "recipe": base.preset, "seed": seed, "split_manifest_sha256": split_ref.sha256}
        logged = mlflow.get_run(parent_id).data.params
        changed = {k: (logged[k], str(v)) for k, v in params.items() if k in logged and logged[k] != str(v)}
        if changed:
            raise ValueError(f"sweep {study_name} was started with other settings {changed} (logged vs now); "
                             "continue it with the same ones or start a study of another name")
        tracking.log_params({k: v for k, v in params.items() if k not in logged})
        mlflow.set_tags({"skinml.sweep_target_trials": str(n_trials), "skinml.sweep_parallel": str(parallel)})
        spec = dataclasses.replace(spec, parent_run_id=parent_id, experiment_id=parent.info.experiment_id)
        if parallel == 1:
            _optimize(spec, study, lock_path=None)
        else:
            _run_workers(spec, parallel, Path(logs))
        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        pruned = [t for t in trials if t.state == TrialState.PRUNED]
        failed = [t for t in trials if t.state == TrialState.FAIL]
        best = study.best_trial if complete else None
        base_trial = next((t for t in complete if t.user_attrs.get("baseline")), None)
        mlflow.log_metrics({"n_complete": len(complete), "n_pruned": len(pruned), "n_failed": len(failed),
                            **({"best_val_bacc": best.value} if best else {}),
                            **({"baseline_val_bacc": base_trial.value} if base_trial else {})})
        if best:
            mlflow.set_tags({"skinml.best_trial": str(best.number),
                             "skinml.best_run_id": best.user_attrs.get("mlflow_run_id", "")})
        with tempfile.TemporaryDirectory() as tmp:
            table = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "duration"))
            table.to_csv(Path(tmp) / "trials.csv", index=False)
            mlflow.log_artifact(str(Path(tmp) / "trials.csv"))
    result = SweepResult(study_name, parent_id, best.value if best else None, dict(best.params) if best else {},
                         best.user_attrs.get("mlflow_run_id") if best else None, len(complete), len(pruned), len(failed),
                         base_trial.value if base_trial else None)
    print(f"sweep {study_name}: {len(complete)} complete, {len(pruned)} pruned, {len(failed)} failed; "
          + (f"best trial {best.number} val bacc {best.value:.3f} {best.params}" if best else "no complete trial")
          + (f"; the recipe itself (trial {base_trial.number}) {base_trial.value:.3f}" if base_trial else ""))
    return result


@dataclass(frozen=True)
class WorkerSpec:
    """Everything one process needs to take trials of a study (JSON, for worker processes)."""

    recipe: dict[str, Any]
    study_name: str
    n_trials: int
    split: str
    data_dir: str | None
    seed: int
    storage: str
    sampler_seed: int
    prune: bool
    device: str
    num_workers: int | None
    constant_liar: bool = False
    worker_index: int = 0
    parent_run_id: str = ""
    experiment_id: str = ""
    lock_file: str = ""  # worker processes: the lock that serialises taking a trial
    threads: int = 0  # worker processes: torch threads (0: torch's default)


def sampler_seed_for(sampler_seed: int, worker: int, n_existing: int) -> int:
    """The TPE seed of one process: the user's seed, this worker, and how many trials the study
    already holds. A resumed study must not reuse the seed of the process before it: TPE's first
    points are random draws, and the same seed would propose the points already tried."""
    import numpy as np

    return int(np.random.SeedSequence([sampler_seed, worker, n_existing]).generate_state(1)[0])


def _load_study(spec: WorkerSpec, storage):
    import warnings

    import optuna

    study = optuna.create_study(
        study_name=spec.study_name, storage=storage, direction="maximize", load_if_exists=True,
        pruner=(optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=3) if spec.prune
                else optuna.pruners.NopPruner()),
    )
    seed = sampler_seed_for(spec.sampler_seed, spec.worker_index, len(study.get_trials(deepcopy=False)))
    with warnings.catch_warnings():  # constant_liar is "experimental" in Optuna 4 (and documented for this use)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=spec.constant_liar)
    return study


@contextlib.contextmanager
def _locked(path: Path | None) -> Iterator[None]:
    """An exclusive lock across this machine's worker processes (no-op without a path)."""
    if path is None:
        yield
        return
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _optimize(spec: WorkerSpec, study, lock_path: Path | None) -> None:
    """Take trials until the study has ``n_trials`` finished or running ones (ask and tell)."""
    import optuna
    from optuna.trial import TrialState

    counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    while True:
        with _locked(lock_path):  # counting and asking as one step: no worker overshoots the target
            if len(study.get_trials(deepcopy=False, states=counted)) >= spec.n_trials:
                return
            trial = study.ask()
        try:
            value = _objective(spec, study.study_name, trial)
        except optuna.TrialPruned as pruned:
            study.tell(trial, state=TrialState.PRUNED)
            log.info("trial %d: pruned (%s)", trial.number, pruned)
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            log.error("trial %d: failed", trial.number)
            raise
        else:
            study.tell(trial, value)
            log.info("trial %d: val bacc %.4f", trial.number, value)


def _objective(spec: WorkerSpec, study_name: str, trial) -> float:
    import optuna

    from skinml.steps.train import train

    base = Recipe.from_dict(spec.recipe)
    fields = suggest(trial, base.model)
    options = {**base.model_options, **fields.pop("model_options")}
    recipe = dataclasses.replace(base, model_options=options, **fields)
    trial.set_user_attr("recipe_fields", json.dumps({**fields, "model_options": options}, sort_keys=True))

    def report(epoch: int, row: dict[str, float]) -> None:
        trial.report(row["val_balanced_accuracy"], epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"epoch {epoch}: val_bacc {row['val_balanced_accuracy']:.3f} below the median")

    is_baseline = bool(trial.user_attrs.get("baseline"))
    # The parent's tag and experiment: a worker process has no active parent run to nest under.
    tags = {TAG_STUDY: study_name, TAG_TRIAL: str(trial.number), MLFLOW_PARENT_RUN_ID: spec.parent_run_id}
    if is_baseline:
        tags[TAG_BASELINE] = "true"
    experiment = mlflow.MlflowClient().get_experiment(spec.experiment_id).name
    name = f"trial-{trial.number}" + ("-baseline" if is_baseline else "")
    log.info("trial %d (%s): %s", trial.number, name, json.dumps(trial.params, sort_keys=True))
    try:
        result = train(recipe, split=spec.split, data_dir=spec.data_dir, seed=spec.seed, run_name=name,
                       extra_tags=tags, epoch_callback=report if spec.prune else None, device=spec.device,
                       num_workers=spec.num_workers, experiment=experiment)
    except optuna.TrialPruned:
        _mark_pruned(study_name, trial.number)
        raise
    trial.set_user_attr("mlflow_run_id", result.run_id)
    mlflow.MlflowClient().log_metric(spec.parent_run_id, "trial_best_val_bacc", result.best_val_bacc,
                                     step=trial.number)
    return result.best_val_bacc


def _run_workers(spec: WorkerSpec, parallel: int, logs: Path) -> None:
    """``parallel`` processes of :func:`worker_main` on the same study; raises if one failed."""
    from skinml.training.processes import run_module_processes, threads_per_process

    shared = dataclasses.replace(spec, lock_file=str(logs / f"{spec.study_name}.lock"),
                                 threads=threads_per_process(parallel))
    specs = [dataclasses.asdict(dataclasses.replace(shared, worker_index=index)) for index in range(parallel)]
    log.info("sweep %s: %d workers, logs in %s", spec.study_name, parallel, logs)
    exits = run_module_processes("skinml.steps.sweep", specs, logs, f"{spec.study_name}-worker")
    failed = [f"worker {index} (exit {code}; see {log_file})" for index, (log_file, code) in enumerate(exits) if code]
    if failed:
        raise RuntimeError(f"sweep {spec.study_name}: {', '.join(failed)}")


def worker_main(spec_file: str) -> None:
    """One worker process: load the study and take trials until the target is reached."""
    import optuna
    import torch

    from skinml.training.processes import exit_on_sigterm

    exit_on_sigterm()  # stopped by its parent: the trial is told FAIL and its run ends FAILED
    spec = WorkerSpec(**json.loads(Path(spec_file).read_text()))
    if spec.threads:
        torch.set_num_threads(spec.threads)
    tracking.setup_tracking()
    study = _load_study(spec, optuna.storages.RDBStorage(spec.storage))
    _optimize(spec, study, Path(spec.lock_file))


def _mark_pruned(study_name: str, number: int) -> None:
    """The pruned trial's child run ended FAILED by its context manager: say why, and mark it KILLED."""
    client = mlflow.MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    for run in client.search_runs(experiments, f"tags.`{TAG_STUDY}` = '{study_name}' and tags.`{TAG_TRIAL}` = '{number}'"):
        client.set_tag(run.info.run_id, TAG_PRUNED, "true")
        client.set_terminated(run.info.run_id, status="KILLED")


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    worker_main(sys.argv[1])
