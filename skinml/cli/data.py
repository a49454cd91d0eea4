"""``skinml split`` and ``skinml synth``: the data the pipeline starts from."""

from __future__ import annotations

import click

from skinml import constants
from skinml.cli.common import choice, data_dir_option, experiment_option, friendly_errors, split_strategy


@click.command()
@data_dir_option
@click.option("--seed", default=42, show_default=True, type=int, help="Random seed of the split.")
@click.option("--strategy", default="stratified", show_default=True, callback=split_strategy,
              type=choice(constants.SPLIT_STRATEGIES, deprecated=constants.DEPRECATED_SPLIT_STRATEGIES, optional=True),
              help="stratified: class proportions kept per split at patient level; random: the original plain "
                   "train_test_split over patient ids.")
@click.option("--val-fraction", default=0.15, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True))
@click.option("--test-fraction", default=0.15, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True))
@click.option("--drop-missing-images", is_flag=True, help="Drop (count, warn, log) rows whose image is missing.")
@experiment_option
@friendly_errors
def split(data_dir, seed, strategy, val_fraction, test_fraction, drop_missing_images, experiment):
    """Patient-level train/val/test split, logged to MLflow as a manifest."""
    from skinml.steps.split import run_split

    run_split(data_dir, seed, strategy, val_fraction, test_fraction, drop_missing_images, experiment)


@click.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@click.option("--n", default=120, show_default=True, type=click.IntRange(1))
@click.option("--image-size", default=64, show_default=True, type=click.IntRange(8))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--nested", is_flag=True, help="Nest images as imgs_part_1/imgs_part_1/ like the Kaggle copy.")
@friendly_errors
def synth(out, n, image_size, seed, nested):
    """Write a synthetic PAD-UFES-20-shaped folder (metadata.csv + PNGs)."""
    from skinml.data.synthetic import make_synthetic_dataset

    path = make_synthetic_dataset(out, n=n, image_size=image_size, seed=seed, nested=nested)
    click.echo(f"wrote {n} synthetic images and metadata.csv to {path}")
