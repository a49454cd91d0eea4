"""``skinml evaluate``, ``skinml compare``, ``skinml eval-compare`` and ``skinml ensemble``: scoring
training runs on their own split."""

from __future__ import annotations

import click

from skinml import constants
from skinml.cli.common import data_dir_option, device_type, empty_to_none, friendly_errors


@click.command()
@click.option("--run-id", required=True, help="Training run to evaluate (its selected checkpoint).")
@click.option("--split", "split_name", default="test", show_default=True, type=click.Choice(constants.EVALUATION_SPLITS))
@data_dir_option
@click.option("--n-boot", default=1000, show_default=True, type=click.IntRange(0), help="Patient bootstrap resamples.")
@click.option("--device", default="cpu", show_default=True, callback=device_type)
@click.option("--explanations/--no-explanations", default=True, show_default=True,
              help="Log the explanation gallery (heatmaps + metadata contributions per class).")
@click.option("--view", type=click.Choice(constants.EVAL_VIEWS), default=None,
              help="Score the photos another way than the checkpoint was validated with (squash: whole photo; "
                   "crop: training scale + centre crop); logged as a variant.")
@click.option("--tta", type=click.Choice(("none", "flips")), default="none", show_default=True,
              help="flips: average the probabilities over the four flips (logged as a variant).")
@friendly_errors
def evaluate(run_id, split_name, data_dir, n_boot, device, explanations, view, tta):
    """Score a training run on its split's test (or validation) rows and log everything."""
    from skinml.steps.evaluate import evaluate_run

    evaluate_run(run_id, split=split_name, data_dir=data_dir, n_boot=n_boot, device=device,
                 explanations=explanations, view=view, tta=tta)


@click.command()
@click.argument("run_ids", nargs=-1)
@click.option("--experiment", "experiments", multiple=True, help="Only runs of these experiments.")
@click.option("--filter", "filter_string", default="", callback=lambda c, p, v: v or "",
              help="Extra MLflow search filter, e.g. \"params.seed = '1'\".")
@click.option("--out", default="outputs/compare", show_default=True, callback=empty_to_none,
              help="Folder for the table and figure.")
@click.option("--no-log", is_flag=True, help="Do not log the comparison as an MLflow run.")
@friendly_errors
def compare(run_ids, experiments, filter_string, out, no_log):
    """Compare evaluated training runs (ids, or all finished ones): table + figure."""
    from skinml.steps.compare import compare_runs

    compare_runs(list(run_ids) or None, [e for e in experiments if e] or None, filter_string,
                 out or "outputs/compare", log=not no_log)


@click.command()
@click.option("--runs", "run_ids", required=True,
              help="Comma-separated training runs of one model, recipe and split (e.g. the seeds of a configuration).")
@click.option("--tta", type=click.Choice(("none", "flips")), default="none", show_default=True,
              help="flips: each member also averages over the four flips of the photo.")
@data_dir_option
@click.option("--device", default="cpu", show_default=True, callback=device_type)
@click.option("--view", type=click.Choice(constants.EVAL_VIEWS), default=None,
              help="Score the photos this way instead of the members' own view (kept for serving).")
@click.option("--run-name", default=None, callback=empty_to_none)
@friendly_errors
def ensemble(run_ids, tta, data_dir, device, view, run_name):
    """Average training runs' checkpoints into one run that evaluate, compare and register take.

    Its validation summaries (best_val_bacc ...) are computed on the split's validation rows, so
    `skinml register --run-id` makes it champion only if validation says it is better.
    """
    from skinml.steps.ensemble import build_ensemble

    build_ensemble(run_ids.split(","), tta=tta, data_dir=data_dir, device=device, run_name=run_name, view=view)


@click.command("eval-compare")
@click.argument("run_a")
@click.argument("run_b")
@click.option("--split", "split_name", default="test", show_default=True, type=click.Choice(constants.EVALUATION_SPLITS),
              help="Whose `skinml evaluate` predictions to pair.")
@click.option("--n-boot", default=2000, show_default=True, type=click.IntRange(1), help="Patient bootstrap resamples.")
@click.option("--seed", default=0, show_default=True, type=int, help="Bootstrap seed.")
@friendly_errors
def eval_compare(run_a, run_b, split_name, n_boot, seed):
    """Pair two evaluated configurations on one split: a - b with a patient bootstrap interval.

    RUN_A and RUN_B may each name several training (or ensemble) runs joined by commas, e.g. the
    five seeds of a recipe: that side's figure is then the mean over its runs, and the interval
    is that of the difference of the means, every run scored on the same resampled patients;
    on all rows and on complete-questionnaire rows. Each run must have been evaluated on the
    split (`skinml evaluate --run-id RUN [--split val]`).
    """
    from skinml.steps.compare import compare_evaluations, format_paired_evaluation

    click.echo(format_paired_evaluation(compare_evaluations(run_a, run_b, split=split_name, n_boot=n_boot, seed=seed)))
