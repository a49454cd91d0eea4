"""``skinml train``, ``skinml main``, ``skinml study``, ``skinml sweep``, ``skinml cv``, ``skinml cv-compare`` and
``skinml models``."""

from __future__ import annotations

import click

from skinml import constants
from skinml.cli.common import (
    OPT_BOOL,
    build_recipe,
    choice,
    data_dir_option,
    device_option,
    empty_to_none,
    experiment_option,
    friendly_errors,
    parse_pairs,
    recipe_options,
    split_strategy,
)


@click.command()
@recipe_options
@data_dir_option
@click.option("--split", "split_ref", default=None, callback=empty_to_none,
              help="Split run id (or manifest path); made with the defaults when omitted.")
@click.option("--seed", default=42, show_default=True, type=int, help="Random seed of the training.")
@click.option("--resume", default=None, callback=empty_to_none, help="Run id to continue from its last checkpoint.")
@device_option
@click.option("--num-workers", default=None, type=click.IntRange(0), help="DataLoader workers (default: by device).")
@click.option("--run-name", default=None, callback=empty_to_none)
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Extra MLflow tag(s) for the run.")
@experiment_option
@friendly_errors
def train(recipe, extra, data_dir, split_ref, seed, resume, device, num_workers, run_name, tags, experiment,
          **overrides):
    """Train a model on a patient-level split, tracked in MLflow."""
    extra_tags = parse_pairs(tags, "--tag")
    resolved = build_recipe(recipe, extra, **overrides)  # every option checked before anything is written
    from skinml.steps.train import train as run_training

    result = run_training(resolved, split=split_ref, data_dir=data_dir, seed=seed, resume=resume,
                          experiment=experiment, device=device, num_workers=num_workers, run_name=run_name,
                          extra_tags=extra_tags)
    if not result.run_id:  # a torchrun process other than rank 0: rank 0 reports the run
        return
    click.echo(
        f"training run {result.run_id}: selected epoch {result.best_epoch} of {result.epochs_run} "
        f"(val loss {result.best_val_loss:.4f}, val balanced accuracy {result.best_val_bacc:.3f})"
    )


@click.command("main")
@recipe_options
@data_dir_option
@click.option("--seed", default=42, show_default=True, type=int, help="Random seed of the training.")
@click.option("--split-seed", default=42, show_default=True, type=int, help="Random seed of the split.")
@click.option("--split-strategy", default="stratified", show_default=True, callback=split_strategy,
              type=choice(constants.SPLIT_STRATEGIES, deprecated=constants.DEPRECATED_SPLIT_STRATEGIES, optional=True))
@click.option("--reuse", type=OPT_BOOL, default=False, show_default=True,
              help="true: reuse steps that already finished with the same inputs and code.")
@click.option("--register", type=OPT_BOOL, default=True, show_default=True, help="false: stop after evaluation.")
@click.option("--model-name", default=None, callback=empty_to_none, help="Registered model name.")
@device_option
@click.option("--n-boot", default=1000, show_default=True, type=click.IntRange(0))
@experiment_option
@friendly_errors
def main_pipeline(recipe, extra, data_dir, seed, split_seed, split_strategy, reuse, register, model_name, device,
                  n_boot, experiment, **overrides):
    """The main job: split -> train -> evaluate -> register, as one parent run."""
    resolved = build_recipe(recipe, extra, **overrides)
    from skinml.steps.main import run_main

    run_main(resolved, data_dir=data_dir, seed=seed, split_seed=split_seed, split_strategy=split_strategy,
             reuse=bool(reuse), register=register is not False, model_name=model_name, device=device, n_boot=n_boot,
             experiment=experiment)


@click.command()
@data_dir_option
@click.option("--seeds", default="42,43,44", show_default=True, help="Comma-separated seeds.")
@click.option("--parallel", default=1, show_default=True, type=click.IntRange(1), help="Jobs at a time.")
@click.option("--num-workers", default=1, show_default=True, type=click.IntRange(0), help="DataLoader workers per job.")
@device_option
@click.option("--split", "split_ref", default=None, callback=empty_to_none, help="Split run id (default: a new one).")
@click.option("--logs", default="outputs/study", show_default=True)
@click.option("--set", "extra", multiple=True, metavar="KEY=VALUE", help="Recipe override for every job.")
@click.option("--choose-default", is_flag=True,
              help="First train the default-recipe candidates and pick the best by validation balanced accuracy.")
@friendly_errors
def study(data_dir, seeds, parallel, num_workers, device, split_ref, logs, extra, choose_default):
    """Run the README's study: train and evaluate every compared configuration."""
    try:
        seed_list = tuple(int(s) for s in seeds.split(","))
    except ValueError:
        raise click.BadParameter(f"expects comma-separated integers, got {seeds!r}", param_hint="--seeds") from None
    overrides = parse_pairs(extra, "--set")
    from skinml.steps.study import run_study

    run_study(data_dir, seed_list, parallel, device, num_workers, split_ref, logs, overrides=overrides,
              choose_default=choose_default)


@click.command("models")
@click.option("--num-metadata-features", default=None, type=click.IntRange(1),
              help="Metadata width (default: that of the default preprocessor).")
def list_models(num_metadata_features):
    """List the available models with their parameter counts (default options)."""
    from skinml.models import describe_models

    if num_metadata_features is None:
        from skinml.data.preprocess import MetadataPreprocessor

        num_metadata_features = len(MetadataPreprocessor().input_columns)
    rows = describe_models(num_metadata_features)
    click.echo(f"{'model':<16}{'family':<10}{'parameters':>14}  backbone")
    for row in rows:
        click.echo(f"{row['name']:<16}{row['family']:<10}{row['parameters']:>14,}  {row['backbone']}")


@click.command("benchmark-train")
@recipe_options
@data_dir_option
@click.option("--split", "split_ref", default=None, callback=empty_to_none,
              help="Split run id (or manifest path); made with the defaults when omitted.")
@device_option
@click.option("--num-workers", default=None, type=click.IntRange(0), help="DataLoader workers (default: by device).")
@click.option("--steps", default=10, show_default=True, type=click.IntRange(1), help="Timed model-bound steps.")
@click.option("--seed", default=42, show_default=True, type=int)
@click.option("--log/--no-log", default=True, show_default=True, help="Log the figures as an MLflow run.")
@click.option("--jobs", default=None, callback=empty_to_none, metavar="N[,N...]",
              help="Instead: N concurrent processes of the benchmark for each N (e.g. 1,2,4); their total images/s.")
@friendly_errors
def benchmark_train(recipe, extra, data_dir, split_ref, device, num_workers, steps, seed, log, jobs, **overrides):
    """Model-bound vs end-to-end training images/s for a recipe, in one process (or N at once: --jobs)."""
    import json

    resolved = build_recipe(recipe, extra, **overrides)
    from skinml.benchmarks.train import benchmark_training
    from skinml.steps.train import resolve_split

    job_counts = _job_counts(jobs) if jobs else None
    split = resolve_split(split_ref, data_dir)
    if job_counts:
        _benchmark_jobs(resolved, split.manifest, data_dir, job_counts, device, seed, num_workers, steps, log)
        return
    result = benchmark_training(resolved, split.manifest, data_dir, device=device, seed=seed,
                                num_workers=num_workers, steps=steps)
    click.echo(json.dumps(result.to_dict(), indent=2))
    click.echo(f"end-to-end {result.end_to_end_images_per_second:.1f} images/s = {100 * result.ratio:.0f}% of the "
               f"model-bound {result.model_bound_images_per_second:.1f} images/s ({result.device})")
    if log:
        import mlflow

        from skinml import tracking

        with tracking.start_run("benchmark", run_name=f"benchmark-train-{resolved.model}") as run:
            tracking.log_params({f"recipe.{k}": v for k, v in resolved.flat().items()}
                                | {"device": result.device, "num_workers": result.num_workers})
            mlflow.log_metrics({"model_bound_images_per_second": result.model_bound_images_per_second,
                                "end_to_end_images_per_second": result.end_to_end_images_per_second,
                                "end_to_end_ratio": result.ratio})
            click.echo(f"logged to run {run.info.run_id}")


def _job_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise click.BadParameter(f"expects comma-separated positive integers, got {text!r}", param_hint="--jobs")
    return counts


def _benchmark_jobs(recipe, manifest, data_dir, job_counts, device, seed, num_workers, steps, log) -> None:
    from skinml.benchmarks.train import concurrent_benchmark

    rows = []
    for count in job_counts:
        result = concurrent_benchmark(recipe, manifest, data_dir, count, device=device, seed=seed,
                                      num_workers=num_workers, steps=steps)
        rows.append(result)
        per_job = ", ".join(f"{r.end_to_end_images_per_second:.1f}" for r in result.results)
        click.echo(f"{count} job(s): total {result.total_images_per_second:.1f} images/s over {result.window_seconds:.1f} s "
                   f"(per job {per_job}; job 0's model-bound rate {result.results[0].model_bound_images_per_second:.1f}; "
                   f"starts within {result.start_spread_seconds:.2f} s) on {result.results[0].device}")
    single = next((r for r in rows if r.jobs == 1), None)
    if single:
        for row in rows:
            click.echo(f"{row.jobs} job(s): {row.total_images_per_second / single.total_images_per_second:.2f}x "
                       "the total of one job")
    if log:
        import mlflow

        from skinml import tracking

        with tracking.start_run("benchmark", run_name=f"benchmark-train-jobs-{recipe.model}") as run:
            tracking.log_params({f"recipe.{k}": v for k, v in recipe.flat().items()}
                                | {"device": rows[0].results[0].device, "jobs": ",".join(map(str, job_counts))})
            mlflow.log_metrics({f"jobs_{row.jobs}_total_images_per_second": row.total_images_per_second for row in rows})
            click.echo(f"logged to run {run.info.run_id}")


@click.command()
@recipe_options
@data_dir_option
@click.option("--study", "study_name", required=True, help="Optuna study name; the same name continues the study.")
@click.option("--trials", "n_trials", default=20, show_default=True, type=click.IntRange(1),
              help="Finished (completed or pruned) trials to reach, counting earlier runs of this study.")
@click.option("--split", "split_ref", default=None, callback=empty_to_none,
              help="Split run id (or manifest path); made with the defaults when omitted.")
@click.option("--seed", default=42, show_default=True, type=int, help="Training seed of every trial.")
@click.option("--storage", default=None, callback=empty_to_none,
              help="Optuna storage URL (default: sqlite optuna.db beside mlflow.db).")
@click.option("--sampler-seed", default=0, show_default=True, type=int)
@click.option("--prune/--no-prune", default=True, show_default=True,
              help="Median pruner on each epoch's validation balanced accuracy.")
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="A new study's first trial is the recipe's own values, under the same budget.")
@click.option("--parallel", default=1, show_default=True, type=click.IntRange(1),
              help="Trials at a time, in as many worker processes (one GPU shared, or the CPU's cores split).")
@click.option("--logs", default="outputs/sweep", show_default=True, help="Folder for the workers' output.")
@device_option
@click.option("--num-workers", default=None, type=click.IntRange(0), help="DataLoader workers (default: by device).")
@experiment_option
@friendly_errors
def sweep(recipe, extra, data_dir, study_name, n_trials, split_ref, seed, storage, sampler_seed, prune, baseline,
          parallel, logs, device, num_workers, experiment, **overrides):
    """Optuna search of the recipe's hyperparameters: one parent run, a child run per trial, resumable."""
    resolved = build_recipe(recipe, extra, **overrides)
    from skinml.steps.sweep import run_sweep

    run_sweep(resolved, study_name, n_trials, split=split_ref, data_dir=data_dir, seed=seed, storage=storage,
              sampler_seed=sampler_seed, prune=prune, experiment=experiment, device=device, num_workers=num_workers,
              baseline=baseline, parallel=parallel, logs=logs)


@click.command("cv")
@recipe_options
@data_dir_option
@click.option("--folds", "k", default=5, show_default=True, type=click.IntRange(2), help="Number of folds.")
@click.option("--split", "split_ref", default=None, callback=empty_to_none,
              help="Split whose train+val rows are folded (test rows stay out); the default split when omitted.")
@click.option("--seed", default=42, show_default=True, type=int, help="Training seed of every fold.")
@click.option("--fold-seed", default=42, show_default=True, type=int, help="Seed of the patient-to-fold deal.")
@click.option("--parallel", default=1, show_default=True, type=click.IntRange(1),
              help="Folds at a time, in as many worker processes (one GPU shared, or the CPU's cores split).")
@click.option("--logs", default="outputs/cv", show_default=True,
              help="Folder for the workers' output (a subfolder per cv run).")
@device_option
@click.option("--num-workers", default=None, type=click.IntRange(0), help="DataLoader workers (default: by device).")
@experiment_option
@friendly_errors
def cv(recipe, extra, data_dir, k, split_ref, seed, fold_seed, parallel, logs, device, num_workers, experiment,
       **overrides):
    """Patient-grouped k-fold cross-validation of a recipe on train+val (parent run, a child per fold)."""
    resolved = build_recipe(recipe, extra, **overrides)
    from skinml.steps.cv import run_cv

    run_cv(resolved, k=k, split=split_ref, data_dir=data_dir, seed=seed, fold_seed=fold_seed, experiment=experiment,
           device=device, num_workers=num_workers, parallel=parallel, logs=logs)


@click.command("cv-compare")
@click.argument("run_a")
@click.argument("run_b")
@click.option("--n-boot", default=2000, show_default=True, type=click.IntRange(1),
              help="Patient bootstrap resamples for the pooled out-of-fold difference.")
@click.option("--seed", default=0, show_default=True, type=int, help="Bootstrap seed.")
@click.option("--out", default=None, callback=empty_to_none,
              help="Also write cv_compare_folds.csv and cv_compare_pooled.csv to this folder.")
@click.option("--no-log", is_flag=True, help="Do not log the comparison as an MLflow run.")
@friendly_errors
def cv_compare(run_a, run_b, n_boot, seed, out, no_log):
    """Pair two `skinml cv` runs made on the same folds: a - b by fold and pooled, with a bootstrap interval.

    RUN_A and RUN_B may each name several cv runs joined by commas (e.g. one per training seed):
    that side's figures are then the mean over its runs, and the interval is that of the
    difference of the means, every run scored on the same resampled patients.
    """
    from skinml.steps.cv import compare_cv, format_cv_comparison, log_cv_comparison, write_cv_comparison

    result = compare_cv(run_a, run_b, n_boot=n_boot, seed=seed)
    click.echo(format_cv_comparison(result))
    if out:
        for path in write_cv_comparison(result, out):
            click.echo(f"wrote {path}")
    if not no_log:
        click.echo(f"logged as run {log_cv_comparison(result, n_boot, seed)}")
