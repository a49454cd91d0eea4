"""Patient-grouped k-fold cross-validation on train+val, as one parent run with a child per fold.

145 validation images with 7 melanomas cannot tell configurations a few points apart; k folds
over the 822 train+val images score every one of them once. ``skinml cv --folds 5 [recipe
options]`` takes a split (the default one unless ``--split``), keeps its test rows out of
everything, deals the train+val patients into ``k`` folds stratified like the split
(:func:`skinml.data.split.patient_folds`), and for each fold logs a split run (that fold is
``val``, the others ``train``), trains the recipe on it and evaluates it on the fold
(:func:`skinml.steps.evaluate.evaluate_run`, validation rows, all subsets incl. complete
questionnaires and the permuted-metadata arm). Everything is a child of one ``cv`` run, which
gets the mean and standard deviation over folds of each figure, the pooled out-of-fold figures
(every train+val image predicted once, by the model that did not train on it), and
``cv_folds.csv`` / ``cv_oof_predictions.csv``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from skinml import tracking
from skinml.data import schema
from skinml.data.split import fold_manifest, manifest_hash, patient_folds, write_manifest
from skinml.evaluation.metrics import compute_metrics
from skinml.steps.compare import aligned_predictions, side_run_ids
from skinml.training.recipe import Recipe

log = logging.getLogger(__name__)

TAG_CV = "skinml.cv_run"
TAG_FOLD = "skinml.cv_fold"
#: Per-fold figures summarised (evaluate's ``evalval_*`` names, without the prefix).
FIGURES = ("balanced_accuracy", "accuracy", "auc_macro", "recall_MEL", "complete_metadata_balanced_accuracy",
           "complete_metadata_n", "incomplete_metadata_balanced_accuracy", "masked_metadata_balanced_accuracy",
           "permuted_metadata_balanced_accuracy", "permuted_metadata_complete_balanced_accuracy")


@dataclass
class CVResult:
    run_id: str
    folds: pd.DataFrame  # one row per fold: its runs and figures
    summary: dict[str, float]


def run_cv(recipe: Recipe, k: int = 5, split: str | None = None, data_dir: str | None = None, seed: int = 42,
           fold_seed: int = 42, experiment: str | None = None, device: str = "auto",
           num_workers: int | None = None, parallel: int = 1, logs: str | Path = "outputs/cv") -> CVResult:
    """``parallel`` > 1 trains that many folds at a time, each in a worker process (one GPU
    shared, or the CPU's cores split between them), their output in ``logs``; the figures are
    those of the same folds trained one after another."""
    from skinml.steps.train import resolve_split

    if parallel < 1:
        raise ValueError(f"parallel must be at least 1, got {parallel}")
    tracking.setup_tracking()
    base = resolve_split(split, data_dir)
    pool = base.manifest[base.manifest["split"].isin(("train", "val"))]
    folds = patient_folds(pool, k, seed=fold_seed)
    with tracking.start_run("cv", experiment=experiment, run_name=f"cv{k}-{recipe.model}-{recipe.preset}-s{seed}",
                            tags={tracking.TAG_MODEL: recipe.model, tracking.TAG_RECIPE: recipe.preset,
                                  tracking.TAG_SPLIT_HASH: base.sha256}) as parent:
        cv_id = parent.info.run_id
        tracking.log_params({"folds": k, "fold_seed": fold_seed, "seed": seed, "model": recipe.model,
                             "base_split": base.run_id or base.source, "base_split_sha256": base.sha256,
                             "n_pool_images": len(pool), **{f"recipe.{key}": v for key, v in recipe.flat().items()}})
        mlflow.set_tag("skinml.cv_parallel", str(parallel))
        jobs = []
        for fold in range(k):
            manifest = fold_manifest(base.manifest, folds, fold)
            jobs.append(FoldJob(fold, _log_fold_split(manifest, fold, k, fold_seed, base, cv_id, data_dir),
                                int((manifest["split"] == "val").sum())))
        common = dict(recipe=recipe.to_dict(), data_dir=data_dir, seed=seed, device=device, num_workers=num_workers,
                      cv_run_id=cv_id, experiment_id=parent.info.experiment_id)
        if parallel == 1:
            outcomes = list(train_folds(FoldSpec(jobs=jobs, **common)))
        else:
            outcomes = _run_fold_workers(common, jobs, parallel, Path(logs) / cv_id)
        rows, predictions = [], []
        for job, (figures, run_id, best_epoch, fold_predictions) in zip(jobs, outcomes):
            rows.append({"fold": job.fold, "train_run_id": run_id, "split_run_id": job.split_run_id,
                         "n_val": job.n_val, "best_epoch": best_epoch, **figures})
            predictions.append(fold_predictions.assign(fold=job.fold))
            mlflow.log_metrics({f"fold_{name}": value for name, value in figures.items() if np.isfinite(value)},
                               step=job.fold)
        table = pd.DataFrame(rows)
        oof = pd.concat(predictions, ignore_index=True)
        summary = _summary(table, oof)
        mlflow.log_metrics(summary)
        with tempfile.TemporaryDirectory() as tmp:
            table.to_csv(Path(tmp, "cv_folds.csv"), index=False)
            oof.to_csv(Path(tmp, "cv_oof_predictions.csv"), index=False)
            mlflow.log_artifacts(tmp)
    print(format_cv(table, summary, k))
    return CVResult(cv_id, table, summary)


@dataclass(frozen=True)
class FoldJob:
    fold: int
    split_run_id: str
    n_val: int


@dataclass(frozen=True)
class FoldSpec:
    """Folds for one process to train and evaluate (JSON, for worker processes)."""

    jobs: list[FoldJob]
    recipe: dict[str, Any]
    data_dir: str | None
    seed: int
    device: str
    num_workers: int | None
    cv_run_id: str
    experiment_id: str
    out_dir: str = ""  # worker processes: where each fold's outcome is written
    threads: int = 0  # worker processes: torch threads (0: torch's default)


#: One fold's outcome: its figures, training run, selected epoch and out-of-fold predictions.
FoldOutcome = tuple[dict[str, float], str, int, pd.DataFrame]


def _log_fold_split(manifest: pd.DataFrame, fold: int, k: int, fold_seed: int, base, cv_id: str,
                    data_dir: str | None) -> str:
    """A split run for one fold (that fold is ``val``, the others ``train``), child of the cv run."""
    with tracking.start_run("split", run_name=f"cv-fold{fold}-split",
                            tags={tracking.TAG_SPLIT_HASH: manifest_hash(manifest), TAG_CV: cv_id,
                                  TAG_FOLD: str(fold)}) as srun:
        tracking.log_params({"data_dir": data_dir or "", "cv_fold": fold,
                             "folds": k, "fold_seed": fold_seed, "base_split_sha256": base.sha256,
                             "drop_missing_images": base.drop_missing_images})
        with tempfile.TemporaryDirectory() as tmp:
            write_manifest(manifest, Path(tmp, "manifest.csv"))
            mlflow.log_artifacts(tmp, artifact_path="split")
        return srun.info.run_id


def train_folds(spec: FoldSpec) -> Iterator[FoldOutcome]:
    """Train the recipe on each of ``spec.jobs``' splits and evaluate it on the held-out fold,
    yielding each fold's outcome as it finishes.

    In the cv process the training runs nest under the active cv run; in a worker process the
    parent is named by its tag, in the cv run's experiment.
    """
    from skinml.steps.evaluate import evaluate_run
    from skinml.steps.train import train

    recipe = Recipe.from_dict(spec.recipe)
    experiment = None
    if mlflow.active_run() is None:
        experiment = mlflow.MlflowClient().get_experiment(spec.experiment_id).name
    for job in spec.jobs:
        tags = {TAG_CV: spec.cv_run_id, TAG_FOLD: str(job.fold)}
        if experiment is not None:
            tags[MLFLOW_PARENT_RUN_ID] = spec.cv_run_id
        result = train(recipe, split=job.split_run_id, data_dir=spec.data_dir, seed=spec.seed,
                       run_name=f"cv-fold{job.fold}", extra_tags=tags, device=spec.device,
                       num_workers=spec.num_workers, experiment=experiment)
        evaluation = evaluate_run(result.run_id, split="val", data_dir=spec.data_dir, n_boot=0, explanations=False)
        figures = {name: float(evaluation.metrics.get(f"evalval_{name}", np.nan)) for name in FIGURES}
        yield figures, result.run_id, int(result.best_epoch), evaluation.predictions


def _run_fold_workers(common: dict[str, Any], jobs: list[FoldJob], parallel: int, logs: Path) -> list[FoldOutcome]:
    """``parallel`` worker processes, worker ``i`` taking folds ``i, i + parallel, ...``; raises
    naming the folds of a worker that failed (and its log)."""
    from skinml.training.processes import run_module_processes, threads_per_process

    workers = min(parallel, len(jobs))
    specs = [FoldSpec(jobs=jobs[index::workers], out_dir=str(logs), threads=threads_per_process(workers), **common)
             for index in range(workers)]
    log.info("cv: %d folds in %d worker processes, logs in %s", len(jobs), workers, logs)
    exits = run_module_processes("skinml.steps.cv", [dataclasses.asdict(spec) for spec in specs], logs, "fold-worker")
    failed = [f"worker {index} (folds {[job.fold for job in spec.jobs]}; exit {code}; see {log_file})"
              for index, (spec, (log_file, code)) in enumerate(zip(specs, exits)) if code]
    if failed:
        raise RuntimeError(f"cv: {', '.join(failed)}")
    outcomes = []
    for job in jobs:
        done = json.loads((logs / f"fold-{job.fold}.json").read_text())
        predictions = pd.read_csv(logs / f"fold-{job.fold}-predictions.csv")
        outcomes.append((done["figures"], done["train_run_id"], done["best_epoch"], predictions))
    return outcomes


def worker_main(spec_file: str) -> None:
    """One worker process: train and evaluate its folds, and write each outcome beside its log."""
    import torch

    from skinml.training.processes import exit_on_sigterm

    exit_on_sigterm()  # stopped by its parent: the fold's run ends FAILED
    raw = json.loads(Path(spec_file).read_text())
    spec = FoldSpec(**{**raw, "jobs": [FoldJob(**job) for job in raw["jobs"]]})
    if spec.threads:
        torch.set_num_threads(spec.threads)
    tracking.setup_tracking()
    out = Path(spec.out_dir)
    # written as each fold finishes, so that a finished fold is on disk even if a later one fails
    for job, (figures, run_id, best_epoch, predictions) in zip(spec.jobs, train_folds(spec)):
        predictions.to_csv(out / f"fold-{job.fold}-predictions.csv", index=False)
        (out / f"fold-{job.fold}.json").write_text(json.dumps({"figures": figures, "train_run_id": run_id,
                                                               "best_epoch": best_epoch}))


def _summary(table: pd.DataFrame, oof: pd.DataFrame) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in FIGURES:
        values = table[name].to_numpy(dtype=float)
        values = values[np.isfinite(values)]
        if len(values):
            out[f"cv_mean_{name}"] = float(values.mean())
            out[f"cv_std_{name}"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    y = oof["true"].map(schema.LABEL_TO_INDEX).to_numpy()
    proba = oof[[f"p_{label}" for label in schema.LABELS]].to_numpy(dtype=float)
    pooled = compute_metrics(y, proba)
    out.update(cv_oof_balanced_accuracy=float(pooled["balanced_accuracy"]), cv_oof_accuracy=float(pooled["accuracy"]),
               cv_oof_n=float(len(oof)))
    complete = oof["complete_metadata"].to_numpy(dtype=bool)
    if complete.any():
        out["cv_oof_complete_metadata_balanced_accuracy"] = float(compute_metrics(y[complete], proba[complete])["balanced_accuracy"])
        out["cv_oof_complete_metadata_n"] = float(complete.sum())
    return out


def format_cv(table: pd.DataFrame, summary: dict[str, float], k: int) -> str:
    lines = [f"{k}-fold patient-grouped cross-validation on train+val (test rows never used)",
             f"  {'fold':<6}{'n':>5}{'bal. acc':>10}{'complete q.':>13}{'permuted':>10}{'MEL rec.':>10}"]
    for row in table.itertuples():
        lines.append(f"  {row.fold:<6}{row.n_val:>5}{row.balanced_accuracy:>10.3f}"
                     f"{row.complete_metadata_balanced_accuracy:>13.3f}{row.permuted_metadata_balanced_accuracy:>10.3f}"
                     f"{row.recall_MEL:>10.3f}")
    for name, label in (("balanced_accuracy", "bal. acc"), ("complete_metadata_balanced_accuracy", "complete q."),
                        ("permuted_metadata_balanced_accuracy", "permuted")):
        if f"cv_mean_{name}" in summary:
            lines.append(f"  {label}: mean {summary[f'cv_mean_{name}']:.3f} +- {summary[f'cv_std_{name}']:.3f} (sd over folds)")
    lines.append(f"  pooled out-of-fold: bal. acc {summary['cv_oof_balanced_accuracy']:.3f} (n={int(summary['cv_oof_n'])})"
                 + (f", complete questionnaire {summary['cv_oof_complete_metadata_balanced_accuracy']:.3f} "
                    f"(n={int(summary['cv_oof_complete_metadata_n'])})" if "cv_oof_complete_metadata_n" in summary else ""))
    return "\n".join(lines)


#: Parameters two cv runs must share for their folds to pair.
PAIRING_PARAMS = ("folds", "fold_seed", "base_split_sha256", "n_pool_images")
#: Per-fold figures compared fold by fold.
PAIRED_FIGURES = ("balanced_accuracy", "complete_metadata_balanced_accuracy", "auc_macro", "recall_MEL",
                  "permuted_metadata_balanced_accuracy")


@dataclass
class CVComparison:
    run_a: str  # side a's cv run, or its runs joined by commas (e.g. one per training seed)
    run_b: str
    names: tuple[str, str]  # how each side is shown: its recipe (or model) and short ids
    folds: pd.DataFrame  # one row per fold: a, b (each the mean over its side's runs) and a - b
    pooled: dict[str, dict[str, dict[str, float]]]  # {"all"|"complete": replicated_bootstrap_diff(...)}
    #: Melanomas found out of fold by a and by b (the mean over each side's runs), and their number.
    mel_found: tuple[float, float, int]
    #: What the two sides were trained with that differs: ``{param: (a's, b's)}`` over the
    #: ``recipe.*`` params, ``model`` and ``seed`` (None: not logged, e.g. a field added since; a
    #: side whose runs differ shows their values joined by "/").
    differences: dict[str, tuple[str | None, str | None]] = dataclasses.field(default_factory=dict)

    @property
    def runs_a(self) -> tuple[str, ...]:
        return tuple(self.run_a.split(","))

    @property
    def runs_b(self) -> tuple[str, ...]:
        return tuple(self.run_b.split(","))


def compare_cv(run_a: str | list[str], run_b: str | list[str], n_boot: int = 2000, seed: int = 0) -> CVComparison:
    """Pair two ``cv`` configurations made on the same folds: fold-by-fold differences, and the
    pooled out-of-fold difference with a patient bootstrap interval (both scored on the same
    resampled patients), on all rows and on complete-questionnaire rows.

    Each side is one cv run or several (a list, or ids joined by commas), e.g. the same recipe
    cross-validated with different training seeds; a side's figures are then the mean over its
    runs, and the pooled interval is that of the difference of the two means
    (:func:`skinml.evaluation.bootstrap.replicated_bootstrap_diff`).

    All runs must share the patient-to-fold deal (number of folds, fold seed, base split), which
    is checked; otherwise their folds hold different patients and nothing pairs.
    """
    from skinml.evaluation.bootstrap import replicated_bootstrap_diff

    sides = [side_run_ids(ids, side, "cv run") for ids, side in ((run_a, "a"), (run_b, "b"))]
    runs = [[_finished_cv_run(run_id) for run_id in ids] for ids in sides]
    everyone = runs[0] + runs[1]
    for name in PAIRING_PARAMS:
        for run in everyone[1:]:
            first, value = everyone[0].data.params.get(name), run.data.params.get(name)
            if first != value:
                raise ValueError(f"cv runs {everyone[0].info.run_id} and {run.info.run_id} were not made on the same "
                                 f"folds: param {name!r} is {first!r} vs {value!r}; rerun one with `skinml cv` and "
                                 "the other's --folds, --fold-seed and --split")
    names = tuple(f"{side[0].data.tags.get(tracking.TAG_RECIPE) or side[0].data.params.get('model', '?')} "
                  f"({', '.join(run.info.run_id[:8] for run in side)})" for side in runs)

    tables = [[_cv_artifact(run.info.run_id, "cv_folds.csv").set_index("fold") for run in side] for side in runs]
    folds = pd.DataFrame({"fold": sorted(tables[0][0].index)})
    for side, side_tables, suffix in zip(runs, tables, ("a", "b")):
        for run, table in zip(side, side_tables):
            if sorted(table.index) != list(folds["fold"]):
                raise ValueError(f"cv runs {everyone[0].info.run_id} and {run.info.run_id} do not list the same folds")
        present = [name for name in PAIRED_FIGURES if all(name in table for table in side_tables)]
        mean = sum(table[present] for table in side_tables) / len(side_tables)
        for name in present:
            folds[f"{name}_{suffix}"] = mean.loc[folds["fold"], name].to_numpy()
    for name in PAIRED_FIGURES:
        if f"{name}_a" in folds and f"{name}_b" in folds:
            folds[f"{name}_diff"] = folds[f"{name}_a"] - folds[f"{name}_b"]
    folds = folds[["fold"] + [f"{name}_{x}" for name in PAIRED_FIGURES for x in ("a", "b", "diff")
                              if f"{name}_diff" in folds]]

    oof, predicted = _aligned_oof(everyone)
    preds = predicted[:len(runs[0])], predicted[len(runs[0]):]
    pooled = {}
    for subset, rows in (("all", np.ones(len(oof), dtype=bool)), ("complete", oof["complete_metadata"].to_numpy(bool))):
        if rows.any():
            pooled[subset] = replicated_bootstrap_diff(oof["true"][rows], [p[rows] for p in preds[0]],
                                                       [p[rows] for p in preds[1]], oof[schema.PATIENT_ID][rows],
                                                       metrics=("balanced_accuracy", "accuracy", "recall_MEL"),
                                                       n_boot=n_boot, seed=seed)
    mel = (oof["true"] == "MEL").to_numpy()
    found = [float(np.mean([(mel & (p == "MEL")).sum() for p in side])) for side in preds]
    mel_found = (found[0], found[1], int(mel.sum()))

    logged = [[run.data.params for run in side] for side in runs]
    keys = sorted({key for side in logged for params in side for key in params
                   if key.startswith("recipe.") or key in ("model", "seed")})
    differences = {}
    for key in keys:
        values = [_side_value([params.get(key) for params in side]) for side in logged]
        if values[0] != values[1]:
            differences[key] = tuple(values)
    return CVComparison(",".join(r.info.run_id for r in runs[0]), ",".join(r.info.run_id for r in runs[1]),
                        names, folds, pooled, mel_found, differences)


def _side_value(values: list[str | None]) -> str | None:
    """One side's value of a param: the value its runs share, or their values joined by "/"."""
    if len(set(values)) == 1:
        return values[0]
    return "/".join("(not logged)" if v is None else v for v in values)


def _aligned_oof(runs: list[mlflow.entities.Run]) -> tuple[pd.DataFrame, list[np.ndarray]]:
    """The out-of-fold rows every run predicted (image, patient, truth, fold) and each run's
    predicted labels for them, in the same row order; refused if the runs predicted other rows."""
    keys = [schema.IMAGE_ID, schema.PATIENT_ID, "true", "complete_metadata", "fold"]
    oofs = [_cv_artifact(run.info.run_id, "cv_oof_predictions.csv") for run in runs]
    return aligned_predictions(oofs, [run.info.run_id for run in runs], keys, "out-of-fold rows",
                               "its fold or patient differs: not the same folds")


def _finished_cv_run(run_id: str) -> mlflow.entities.Run:
    run = tracking.get_run(run_id)
    step = run.data.tags.get(tracking.TAG_STEP)
    if step != "cv":
        raise ValueError(f"run {run_id} is a {step or 'non-skinml'} run, not a `skinml cv` run")
    if run.info.status != "FINISHED":
        raise ValueError(f"cv run {run_id} is {run.info.status}, not FINISHED: its folds are incomplete")
    return run


def _cv_artifact(run_id: str, name: str) -> pd.DataFrame:
    return pd.read_csv(tracking.download_artifact(run_id, name))


def format_cv_comparison(result: CVComparison) -> str:
    a, b = result.names
    shown = [f"{key.removeprefix('recipe.')} {'(not logged)' if va is None else va} vs "
             f"{'(not logged)' if vb is None else vb}" for key, (va, vb) in result.differences.items()]
    several = len(result.runs_a) > 1 or len(result.runs_b) > 1
    lines = [f"paired cross-validation: a = {a}, b = {b} (same patient folds)"
             + ("; each side's figures are the mean over its runs" if several else ""),
             f"  trained with: {'; '.join(shown)}" if shown else "  trained with: the same recipe, model and seed",
             f"  {'fold':<6}{'bal. acc a':>12}{'b':>8}{'a - b':>8}{'complete q. a':>15}{'b':>8}{'a - b':>8}"]
    f = result.folds
    for row in f.itertuples():
        lines.append(f"  {row.fold:<6}{row.balanced_accuracy_a:>12.3f}{row.balanced_accuracy_b:>8.3f}"
                     f"{row.balanced_accuracy_diff:>+8.3f}{row.complete_metadata_balanced_accuracy_a:>15.3f}"
                     f"{row.complete_metadata_balanced_accuracy_b:>8.3f}{row.complete_metadata_balanced_accuracy_diff:>+8.3f}")
    for name, label in (("balanced_accuracy", "bal. acc"), ("complete_metadata_balanced_accuracy", "complete q."),
                        ("auc_macro", "macro AUC"), ("recall_MEL", "MEL recall")):
        if f"{name}_diff" in f:
            diff = f[f"{name}_diff"].dropna()
            lines.append(f"  {label} a - b by fold: mean {diff.mean():+.3f}, a ahead in {(diff > 0).sum()} of {len(diff)}")
    for subset, label in (("all", "all rows"), ("complete", "complete questionnaire")):
        if subset in result.pooled:
            ba = result.pooled[subset]["balanced_accuracy"]
            lines.append(f"  pooled out-of-fold bal. acc, {label}: a {ba['a']:.3f}, b {ba['b']:.3f}, a - b {ba['estimate']:+.3f} "
                         f"[{ba['low']:+.3f}, {ba['high']:+.3f}] (95% patient bootstrap, a ahead in "
                         f"{100 * ba['p_a_better']:.0f}% of resamples)")
    found_a, found_b, n_mel = result.mel_found
    lines.append(f"  melanomas found out of fold{' (mean over runs)' if several else ''}: a {found_a:g} of {n_mel}, "
                 f"b {found_b:g} of {n_mel}")
    return "\n".join(lines)


def write_cv_comparison(result: CVComparison, out: str | Path) -> list[Path]:
    """``cv_compare_folds.csv`` (a, b, a - b per fold) and ``cv_compare_pooled.csv`` (one row per
    subset and metric) under ``out``."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    folds = result.folds.assign(run_a=result.run_a, run_b=result.run_b)
    pooled = pd.DataFrame([{"subset": subset, "metric": metric, "run_a": result.run_a, "run_b": result.run_b, **values}
                           for subset, by_metric in result.pooled.items() for metric, values in by_metric.items()])
    paths = [folder / "cv_compare_folds.csv", folder / "cv_compare_pooled.csv"]
    folds.to_csv(paths[0], index=False)
    pooled.to_csv(paths[1], index=False)
    return paths


def log_cv_comparison(result: CVComparison, n_boot: int, seed: int) -> str:
    """Log the comparison as a ``cv-compare`` run (params: both runs; metrics: the pooled a - b
    with its interval per subset; artifacts: both CSVs), so it sits beside the cv runs in the UI."""
    tags = {"skinml.cv_run_a": result.run_a, "skinml.cv_run_b": result.run_b}
    short = ["+".join(run_id[:8] for run_id in ids) for ids in (result.runs_a, result.runs_b)]
    with tracking.start_run("cv-compare", run_name=f"cv-compare-{short[0]}-{short[1]}",
                            tags=tags) as run:
        tracking.log_params({"run_a": result.run_a, "run_b": result.run_b, "name_a": result.names[0],
                             "name_b": result.names[1], "n_boot": n_boot, "bootstrap_seed": seed})
        mlflow.set_tag("skinml.cv_differences", "; ".join(f"{k}: {va} vs {vb}" for k, (va, vb) in
                                                          result.differences.items())[:5000] or "none")
        names = {"a": "a", "b": "b", "estimate": "diff", "low": "diff_low", "high": "diff_high",
                 "p_a_better": "p_a_better"}
        metrics = {f"oof_{subset}_{metric}_{name}": values[key]
                   for subset, by_metric in result.pooled.items() for metric, values in by_metric.items()
                   for key, name in names.items() if np.isfinite(values[key])}
        for name in PAIRED_FIGURES:
            if f"{name}_diff" in result.folds:
                diff = result.folds[f"{name}_diff"].dropna()
                if len(diff):
                    metrics[f"fold_mean_{name}_diff"] = float(diff.mean())
                    metrics[f"folds_a_ahead_{name}"] = float((diff > 0).sum())
        mlflow.log_metrics(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            write_cv_comparison(result, tmp)
            mlflow.log_artifacts(tmp)
        return run.info.run_id


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    worker_main(sys.argv[1])
