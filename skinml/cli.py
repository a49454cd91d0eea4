"""The ``skinml`` command. Parses options, calls library code, and turns known errors into
one-line messages (no tracebacks for user mistakes)."""

from __future__ import annotations

import functools
import logging
import sys

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


def main() -> None:  # pragma: no cover - console entry
    cli(prog_name="skinml")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
