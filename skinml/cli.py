"""The ``skinml`` command. Parses options, calls library code, and turns known errors into
one-line messages (no tracebacks for user mistakes)."""

from __future__ import annotations

import functools
import logging

import click


def _friendly_errors(func):
    """Show expected failures (bad data, bad options, offline downloads) as one clear line."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from skinml.data.images import ImageError
        from skinml.data.preprocess import MetadataError
        from skinml.data.source import DatasetError

        expected = (DatasetError, ImageError, MetadataError, ValueError, FileNotFoundError)
        try:
            from skinml.models.backbones import PretrainedWeightsUnavailable

            expected += (PretrainedWeightsUnavailable,)
        except ImportError:
            pass
        try:
            return func(*args, **kwargs)
        except expected as exc:
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc

    return wrapper


def _empty_to_none(_ctx, _param, value):
    """MLproject passes unset optional parameters as empty strings."""
    return value or None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def cli(verbose: bool) -> None:
    """skinml: skin-lesion classification from photos and patient metadata (PAD-UFES-20)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "mlflow.store", "urllib3", "PIL", "matplotlib", "timm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


data_dir_option = click.option(
    "--data-dir", default=None, callback=_empty_to_none,
    help="PAD-UFES-20 folder (else $SKINML_DATA_DIR, else a kagglehub download).",
)
experiment_option = click.option("--experiment", default=None, callback=_empty_to_none,
                                 help="MLflow experiment (default 'skinml'; ignored inside `mlflow run`).")


@cli.command()
@data_dir_option
@click.option("--seed", default=42, show_default=True, type=int)
@click.option("--strategy", default="stratified", show_default=True, type=click.Choice(["stratified", "seed"]),
              help="stratified: class proportions kept per split at patient level; seed: the original plain "
                   "train_test_split over patient ids.")
@click.option("--val-fraction", default=0.15, show_default=True, type=float)
@click.option("--test-fraction", default=0.15, show_default=True, type=float)
@click.option("--drop-missing-images", is_flag=True, help="Drop (count, warn, log) rows whose image is missing.")
@experiment_option
@_friendly_errors
def split(data_dir, seed, strategy, val_fraction, test_fraction, drop_missing_images, experiment):
    """Patient-level train/val/test split, logged to MLflow as a manifest."""
    from skinml.pipeline import run_split

    run_split(data_dir, seed, strategy, val_fraction, test_fraction, drop_missing_images, experiment)


@cli.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@click.option("--n", default=120, show_default=True, type=int, help="Number of images.")
@click.option("--image-size", default=64, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--nested", is_flag=True, help="Nest images as imgs_part_1/imgs_part_1/ like the Kaggle copy.")
@_friendly_errors
def synth(out, n, image_size, seed, nested):
    """Write a synthetic PAD-UFES-20-shaped folder (metadata.csv + PNGs)."""
    from skinml.data.synthetic import make_synthetic_dataset

    path = make_synthetic_dataset(out, n=n, image_size=image_size, seed=seed, nested=nested)
    click.echo(f"wrote {n} synthetic images and metadata.csv to {path}")


def _recipe_options(func):
    """Options that override a recipe preset; unset ones keep the preset's value."""
    from skinml.training.recipe import IMBALANCE_CHOICES

    options = [
        click.option("--recipe", default="default", show_default=True, help="Preset: default or seed (the original)."),
        click.option("--model", default="cnn_fusion", show_default=True,
                     help="cnn_fusion, spatial_fusion, image_only or metadata_only."),
        click.option("--backbone", default=None, callback=_empty_to_none, help="timm backbone name."),
        click.option("--pretrained", default=None, callback=_empty_to_none,
                     help="auto, none, package, timm or a weights file."),
        click.option("--imbalance", default=None, callback=_empty_to_none, help=f"One of {', '.join(IMBALANCE_CHOICES)}."),
        click.option("--epochs", default=None, callback=_empty_to_none),
        click.option("--batch-size", default=None, callback=_empty_to_none),
        click.option("--lr-backbone", default=None, callback=_empty_to_none),
        click.option("--lr-head", default=None, callback=_empty_to_none),
        click.option("--weight-decay", default=None, callback=_empty_to_none),
        click.option("--label-smoothing", default=None, callback=_empty_to_none),
        click.option("--image-size", default=None, callback=_empty_to_none),
        click.option("--early-stopping-patience", default=None, callback=_empty_to_none),
        click.option("--include-biopsed", default=None, callback=_empty_to_none,
                     help="true reproduces the original 22 features (biopsed is a label proxy)."),
        click.option("--missing-indicators", default=None, callback=_empty_to_none),
        click.option("--metadata-encoding", default=None, callback=_empty_to_none),
        click.option("--set", "extra", multiple=True, metavar="KEY=VALUE",
                     help="Any other recipe field, e.g. --set augment_rotation=10 --set optimizer=adamw."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _build_recipe(recipe: str, extra: tuple[str, ...], **overrides):
    import json

    from skinml.training.recipe import resolve_recipe

    for item in extra:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        if key == "model_options":
            value = json.loads(value)
        overrides[key.replace("-", "_")] = value
    return resolve_recipe(recipe, **overrides)


@cli.command()
@_recipe_options
@data_dir_option
@click.option("--split", "split_ref", default=None, callback=_empty_to_none,
              help="Split run id (or manifest path); made with the defaults when omitted.")
@click.option("--seed", default=42, show_default=True, type=int)
@click.option("--resume", default=None, callback=_empty_to_none, help="Run id to continue from its last checkpoint.")
@click.option("--device", default="auto", show_default=True)
@click.option("--num-workers", default=None, callback=_empty_to_none, type=int)
@click.option("--run-name", default=None, callback=_empty_to_none)
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Extra MLflow tag(s) for the run.")
@experiment_option
@_friendly_errors
def train(recipe, extra, data_dir, split_ref, seed, resume, device, num_workers, run_name, tags, experiment,
          **overrides):
    """Train a model on a patient-level split, tracked in MLflow."""
    from skinml.training.run import train as run_training

    resolved = _build_recipe(recipe, extra, **overrides)
    bad = [t for t in tags if "=" not in t]
    if bad:
        raise ValueError(f"--tag expects KEY=VALUE, got {bad}")
    result = run_training(resolved, split=split_ref, data_dir=data_dir, seed=seed, resume=resume,
                          experiment=experiment, device=device, num_workers=num_workers, run_name=run_name,
                          extra_tags=dict(t.split("=", 1) for t in tags))
    click.echo(
        f"training run {result.run_id}: selected epoch {result.best_epoch} of {result.epochs_run} "
        f"(val loss {result.best_val_loss:.4f}, val balanced accuracy {result.best_val_bacc:.3f})"
    )


@cli.command("main")
@_recipe_options
@data_dir_option
@click.option("--seed", default=42, show_default=True, type=int, help="Training seed.")
@click.option("--split-seed", default=42, show_default=True, type=int)
@click.option("--split-strategy", default="stratified", show_default=True, type=click.Choice(["stratified", "seed"]))
@click.option("--reuse", type=click.BOOL, default=False, show_default=True,
              help="true: reuse steps that already finished with the same inputs.")
@click.option("--register", type=click.BOOL, default=True, show_default=True,
              help="false: stop after evaluation.")
@click.option("--model-name", default=None, callback=_empty_to_none, help="Registered model name.")
@click.option("--device", default="auto", show_default=True)
@click.option("--n-boot", default=1000, show_default=True, type=int)
@experiment_option
@_friendly_errors
def main_pipeline(recipe, extra, data_dir, seed, split_seed, split_strategy, reuse, register, model_name, device,
                  n_boot, experiment, **overrides):
    """The main job: split -> train -> evaluate -> register, as one parent run."""
    from skinml.workflow import run_main

    resolved = _build_recipe(recipe, extra, **overrides)
    run_main(resolved, data_dir=data_dir, seed=seed, split_seed=split_seed, split_strategy=split_strategy,
             reuse=reuse, register=register, model_name=model_name, device=device, n_boot=n_boot,
             experiment=experiment)


@cli.command()
@click.option("--run-id", required=True, help="Training run to evaluate (its selected checkpoint).")
@click.option("--split", "split_name", default="test", show_default=True, type=click.Choice(["test", "val"]))
@data_dir_option
@click.option("--n-boot", default=1000, show_default=True, type=int, help="Patient bootstrap resamples.")
@click.option("--device", default="cpu", show_default=True)
@_friendly_errors
def evaluate(run_id, split_name, data_dir, n_boot, device):
    """Score a training run on its split's test (or validation) rows and log everything."""
    from skinml.evaluation.report import evaluate_run

    evaluate_run(run_id, split=split_name, data_dir=data_dir, n_boot=n_boot, device=device)


@cli.command()
@click.argument("run_ids", nargs=-1)
@click.option("--experiment", "experiments", multiple=True, help="Only runs of these experiments.")
@click.option("--filter", "filter_string", default="", help="Extra MLflow search filter, e.g. \"params.seed = '1'\".")
@click.option("--out", default="outputs/compare", show_default=True, help="Folder for the table and figure.")
@click.option("--no-log", is_flag=True, help="Do not log the comparison as an MLflow run.")
@_friendly_errors
def compare(run_ids, experiments, filter_string, out, no_log):
    """Compare evaluated training runs (ids, or all finished ones): table + figure."""
    from skinml.evaluation.runs import compare_runs

    compare_runs(list(run_ids) or None, list(experiments) or None, filter_string, out, log=not no_log)


@cli.command()
@data_dir_option
@click.option("--seeds", default="42,43,44", show_default=True, help="Comma-separated seeds.")
@click.option("--parallel", default=1, show_default=True, type=int, help="Jobs at a time.")
@click.option("--num-workers", default=1, show_default=True, type=int, help="DataLoader workers per job.")
@click.option("--device", default="auto", show_default=True)
@click.option("--split", "split_ref", default=None, callback=_empty_to_none, help="Split run id (default: a new one).")
@click.option("--logs", default="outputs/study", show_default=True)
@click.option("--set", "extra", multiple=True, metavar="KEY=VALUE", help="Recipe override for every job.")
@click.option("--choose-default", is_flag=True,
              help="First train the default-recipe candidates and pick the best by validation balanced accuracy.")
@_friendly_errors
def study(data_dir, seeds, parallel, num_workers, device, split_ref, logs, extra, choose_default):
    """Run the README's study: train and evaluate every compared configuration."""
    from skinml.study import run_study

    overrides = dict(item.split("=", 1) for item in extra)
    run_study(data_dir, tuple(int(s) for s in seeds.split(",")), parallel, device, num_workers, split_ref, logs,
              overrides=overrides, choose_default=choose_default)


@cli.command("models")
@click.option("--num-metadata-features", default=None, type=int,
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


import skinml.cli_serving  # noqa: E402, F401  (registers register/predict/score on the group above)

if __name__ == "__main__":  # pragma: no cover - prefer `python -m skinml`, which sees every command
    cli(prog_name="skinml")
