"""``skinml register``, ``skinml predict``, ``skinml score`` and ``skinml benchmark-serving``.

Heavy imports (torch, MLflow) happen inside the commands so ``skinml --help`` stays fast.
"""

from __future__ import annotations

import functools
import json

import click

from skinml import constants
from skinml.cli.common import empty_to_none as _empty_to_none
from skinml.cli.common import friendly_errors as _friendly_errors
from skinml.cli.common import model_name_option as name_option
from skinml.data import schema
from skinml.data.image_config import DEFAULT_MAX_PIXELS


def _serving_errors(func):
    """Bad requests, refused registrations and server errors as one line, no traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from mlflow.exceptions import MlflowException

        from skinml.serving.client import ServingError

        try:
            return func(*args, **kwargs)
        except (ServingError, MlflowException) as exc:
            raise click.ClickException(str(exc.message if isinstance(exc, MlflowException) else exc)) from exc

    return _friendly_errors(wrapper)


@click.command()
@name_option
@click.option("--metric", default=constants.SELECTION_METRIC, show_default=True,
              callback=lambda c, p, v: v or constants.SELECTION_METRIC,
              help="Stepless validation summary that ranks training runs (best_val_loss is minimised). Test "
                   "metrics are refused.")
@click.option("--family", default="fusion", show_default=True, callback=lambda c, p, v: v or "fusion",
              type=click.Choice(["fusion", "baseline", "any"]), help="Model family to choose from.")
@click.option("--model", default=None, callback=_empty_to_none, help="Only runs of this model (e.g. cnn_fusion).")
@click.option("--recipe", default=None, callback=_empty_to_none,
              help="Only runs of this recipe (tag skinml.recipe), e.g. the validation-chosen `default`.")
@click.option("--run-id", default=None, callback=_empty_to_none, help="Register this training run instead of choosing.")
@click.option("--experiment", "experiments", multiple=True,
              help="Search only these experiments (names; repeatable). Default: every experiment.")
@click.option("--force", type=click.BOOL, is_flag=False, flag_value=True, default=False,
              help="Move the champion alias even if the new version is not better (also `--force true`); "
                   "registers a run again even when it already has a version.")
@click.option("--max-pixels", default=DEFAULT_MAX_PIXELS, show_default=True, type=int,
              help="The served model refuses photos with more pixels (decompression bombs).")
@_serving_errors
def register(name, metric, family, model, recipe, run_id, experiments, force, max_pixels):
    """Register the best fusion training run (by validation) and move `champion` if it is better."""
    from mlflow.tracking import MlflowClient

    from skinml import tracking
    from skinml.steps import register as registry

    experiment_ids = None
    experiments = [e for e in experiments if e]
    if experiments:
        tracking.setup_tracking()
        client = MlflowClient()
        experiment_ids = []
        for experiment in experiments:
            found = client.get_experiment_by_name(experiment)
            if found is None:
                raise click.BadParameter(f"no experiment named {experiment!r}", param_hint="--experiment")
            experiment_ids.append(found.experiment_id)
    result = registry.register_best(name=name, metric=metric, family=None if family == "any" else family, model=model,
                                    run_id=run_id, experiment_ids=experiment_ids, force=force, pixel_limit=max_pixels,
                                    recipe=recipe)
    verb = "registered" if result["registered"] else "kept"
    click.echo(f"{verb} {result['name']} version {result['version']} from training run {result['run_id']} "
               f"({result['metric']}={result['value']:.4f})")
    click.echo(f"champion: v{result['champion_version']} ({result['reason']})")


def _clinical_options(func):
    """One option per clinical field of metadata.csv (--age, --region, --diameter-1 ...)."""
    for column in reversed(schema.FEATURES):
        values = schema.VOCABULARIES.get(column)
        hint = "number" if column in schema.NUMERIC_FEATURES else ", ".join(values or ())
        func = click.option(f"--{column.replace('_', '-')}", column, default=None, callback=_empty_to_none,
                            help=f"{column} as in metadata.csv ({hint}).")(func)
    return func


def _print_prediction(row, labels) -> None:
    click.echo(f"{row['label']} ({row['label_name']}): {row['probability']:.3f}")
    click.echo("  " + "  ".join(f"{label} {row[label]:.3f}" for label in labels))
    for message in row.get("warnings") or []:
        click.echo(f"  warning: {message}", err=True)


@click.command()
@click.option("--image", "image_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Clinical photo (PNG or JPEG).")
@_clinical_options
@click.option("--url", default=None, callback=_empty_to_none,
              help="A running `mlflow models serve`, e.g. http://127.0.0.1:5000. Default: score in-process.")
@click.option("--model-uri", default=None, callback=_empty_to_none,
              help="In-process model (default models:/<name>@champion).")
@name_option
@click.option("--top-k", default=None, type=int, help="How many labels to list (1-6; default 3).")
@click.option("--json", "as_json", is_flag=True, help="Print the model's answer as JSON.")
@_serving_errors
def predict(image_path, url, model_uri, name, top_k, as_json, **clinical):
    """Score one photo and its clinical fields (unset fields are imputed as in training)."""
    from skinml.serving import client

    request = client.build_request([image_path], [{k: v for k, v in clinical.items() if v is not None}])
    if url:
        answer = client.predict_remote(url, request, top_k)
    else:
        model = client.load_model(model_uri or client.model_uri_for(name))
        answer = client.predict_local(model, request, top_k)
    row = answer.iloc[0].to_dict()
    if as_json:
        click.echo(json.dumps({k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in row.items()}, indent=2))
    else:
        _print_prediction(row, [label for label in schema.LABELS if label in row])


@click.command()
@click.option("--data-dir", default=None, callback=_empty_to_none,
              help="Folder with metadata.csv and the photos (else $SKINML_DATA_DIR).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="CSV to write.")
@click.option("--url", default=None, callback=_empty_to_none, help="Score on a running server instead of in-process.")
@click.option("--model-uri", default=None, callback=_empty_to_none,
              help="In-process model (default models:/<name>@champion).")
@name_option
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1, 256))
@click.option("--top-k", default=None, type=int, help="How many labels to list per row (1-6; default 3).")
@click.option("--drop-missing-images", is_flag=True, help="Skip rows whose photo is missing.")
@_serving_errors
def score(data_dir, out, url, model_uri, name, batch_size, top_k, drop_missing_images):
    """Score every photo of a folder with the registered model; writes one CSV row per photo."""
    from pathlib import Path

    from skinml.serving import client

    model = None if url else client.load_model(model_uri or client.model_uri_for(name))
    table = client.score_folder(data_dir, model=model, url=url, batch_size=batch_size, top_k=top_k,
                                drop_missing_images=drop_missing_images)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    seconds = table.attrs.get("seconds", float("nan"))
    click.echo(f"scored {len(table)} photos in {seconds:.1f}s -> {out}")
    if "true_label" in table.columns and len(table):
        correct = table["true_label"] == table["label"]
        recalls = [correct[table["true_label"] == label].mean() for label in schema.LABELS
                   if (table["true_label"] == label).any()]
        click.echo(f"accuracy {correct.mean():.3f}, balanced accuracy {sum(recalls) / len(recalls):.3f} "
                   "(against metadata.csv's diagnostic)")
    warned = int((table.get("warnings", "") != "").sum()) if "warnings" in table.columns else 0
    if warned:
        click.echo(f"{warned} row(s) had clinical values the model never saw (scored as unknown); see the "
                   "'warnings' column", err=True)


@click.command("benchmark-serving")
@click.option("--url", default="http://127.0.0.1:5000", show_default=True, help="Running `mlflow models serve`.")
@click.option("--data-dir", default=None, callback=_empty_to_none, help="PAD-UFES-20 folder with photos to send.")
@click.option("--model-uri", default=f"models:/{constants.REGISTERED_MODEL_NAME}@{constants.CHAMPION_ALIAS}",
              show_default=True,
              help="The model the server runs (its bare forward pass is timed too).")
@click.option("--n-single", default=50, show_default=True, type=click.IntRange(1))
@click.option("--n-batch", default=5, show_default=True, type=click.IntRange(0))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--rounds", default=5, show_default=True, type=click.IntRange(1),
              help="The layers take turns this many times (each times a share of the requests), so a "
                   "machine whose speed drifts touches them alike.")
@click.option("--soak", "soak_requests", default=0, show_default=True, type=click.IntRange(0),
              help="Instead: send this many single-photo requests one after another and record the "
                   "server's resident memory (needs --server-pid).")
@click.option("--server-pid", default=None, type=int, help="Process id of the server (its children count too).")
@click.option("--every", default=500, show_default=True, type=click.IntRange(1), help="Soak: RSS sample interval.")
def benchmark_serving(url, data_dir, model_uri, n_single, n_batch, batch_size, rounds, soak_requests, server_pid,
                      every):
    """Latency (median, p95) and throughput of a running server vs the bare model forward,
    or (--soak N) the server's memory over N requests."""
    import json

    if soak_requests:
        if server_pid is None:
            raise click.BadParameter("the soak needs the server's process id", param_hint="--server-pid")
        from skinml.data.source import load_metadata
        from skinml.serving import client
        from skinml.serving.benchmark import soak

        row = load_metadata(data_dir).iloc[[0]]
        clinical = {k: v for k, v in row.drop(columns=["image_path"]).iloc[0].items()
                    if k in client.request_fields() and not schema.is_missing(v)}
        body = client.request_body(client.build_request([row["image_path"].iloc[0]], [clinical]))
        result = soak(url, body, server_pid, n_requests=soak_requests, every=every)
    else:
        from skinml.serving.benchmark import benchmark

        result = benchmark(url, data_dir, model_uri, n_single, n_batch, batch_size, rounds=rounds)
    click.echo(json.dumps(result, indent=2))
