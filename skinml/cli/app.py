"""``skinml app`` (the demo page) and ``skinml app-calibrate`` (its thresholds).

Register on the group with ``("skinml.cli.app", ("app", "app_calibrate"))`` in
:data:`skinml.cli._COMMANDS`. FastAPI, uvicorn, torch and MLflow are imported inside the
commands so ``skinml --help`` stays fast.
"""

from __future__ import annotations

import ipaddress
import logging

import click

from skinml.cli.common import empty_to_none as _empty_to_none
from skinml.cli.common import friendly_errors as _friendly_errors

log = logging.getLogger(__name__)

DEFAULT_MODEL_URI = "models:/skin-lesion-classifier@champion"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command("app")
@click.option("--model-uri", default=None, callback=_empty_to_none,
              help=f"Registered model to load in-process with mlflow.pyfunc [default: {DEFAULT_MODEL_URI}].")
@click.option("--model-url", default=None, callback=_empty_to_none,
              help="Forward to a running `mlflow models serve` instead, e.g. http://127.0.0.1:5000.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback exposes the page to the network.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--config", "config_path", default=None, callback=_empty_to_none,
              type=click.Path(exists=True, dir_okay=False),
              help="Thresholds written by `skinml app-calibrate` (default: calibrate from the model's training "
                   "run's validation predictions when it has them, else uncalibrated).")
@click.option("--max-body-mb", default=None, type=click.FloatRange(min=0.01),
              help="Refuse request bodies above this size (default: the model's photo limit plus 1 MiB).")
@_friendly_errors
def app(model_uri, model_url, host, port, config_path, max_body_mb):
    """Serve the clinician-facing demo page (photo + questionnaire -> prediction, referral, notes)."""
    import uvicorn
    from mlflow.exceptions import MlflowException

    from skinml.app import build_app

    if model_uri and model_url:
        raise click.UsageError("give --model-uri (in-process) or --model-url (a model server), not both")
    if not _is_loopback(host):
        click.echo(f"warning: binding to {host} makes the page reachable from the network; it has no "
                   "authentication", err=True)
    try:
        application = build_app(model_uri=None if model_url else (model_uri or DEFAULT_MODEL_URI),
                                model_url=model_url, config_path=config_path,
                                max_body_bytes=int(max_body_mb * 2**20) if max_body_mb else None)
    except MlflowException as exc:
        raise click.ClickException(f"cannot load {model_uri or DEFAULT_MODEL_URI}: {exc.message}") from exc
    click.echo(f"skinml demo page on http://{host}:{port}/ (API reference: /api); research tool, not a medical device")
    uvicorn.run(application, host=host, port=port, log_level="info", server_header=False)


@click.command("app-calibrate")
@click.option("--run-id", default=None, callback=_empty_to_none,
              help="Training run whose evaluation/val (and evaluation/test) predictions.csv to use; run "
                   "`skinml evaluate --run-id RUN --split val` first.")
@click.option("--val", "val_csv", default=None, callback=_empty_to_none, type=click.Path(exists=True, dir_okay=False),
              help="Validation predictions.csv (instead of --run-id).")
@click.option("--test", "test_csv", default=None, callback=_empty_to_none,
              type=click.Path(exists=True, dir_okay=False),
              help="Test predictions.csv: reports the referral rule's sensitivity/specificity there.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="JSON file to write (pass to --config).")
@click.option("--target-sensitivity", default=0.95, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Share of malignant validation lesions the referral threshold must flag.")
@click.option("--target-accuracy", default=0.80, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Accuracy the predictions not flagged as unsure must reach on validation.")
@click.option("--n-boot", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Patient bootstrap resamples for the intervals.")
@_friendly_errors
def app_calibrate(run_id, val_csv, test_csv, out, target_sensitivity, target_accuracy, n_boot):
    """Choose the page's uncertainty and referral thresholds on validation predictions."""
    from mlflow.exceptions import MlflowException

    from skinml import tracking
    from skinml.app.thresholds import calibrate

    if bool(run_id) == bool(val_csv):
        raise click.UsageError("give --run-id or --val")
    source = val_csv
    if run_id:
        tracking.setup_tracking()
        try:
            val_csv = tracking.download_artifact(run_id, "evaluation/val/predictions.csv")
        except (MlflowException, OSError) as exc:
            raise click.ClickException(f"run {run_id} has no evaluation/val/predictions.csv ({exc}); run "
                                       f"`skinml evaluate --run-id {run_id} --split val` first") from exc
        if test_csv is None:
            try:
                test_csv = tracking.download_artifact(run_id, "evaluation/test/predictions.csv")
            except (MlflowException, OSError):
                click.echo(f"run {run_id} has no evaluation/test/predictions.csv: no test figures", err=True)
        source = f"training run {run_id}"
    config = calibrate(val_csv, test_csv, target_sensitivity=target_sensitivity, target_accuracy=target_accuracy,
                       n_boot=n_boot, source=source)
    path = config.save(out)
    click.echo(f"wrote {path}")
    click.echo(f"referral threshold (P(BCC)+P(MEL)+P(SCC)): {config.referral_threshold:.4f} "
               f"for >= {target_sensitivity:.0%} malignant sensitivity on validation")
    test = config.calibration.get("referral_test")
    if test:
        sens, spec = test["sensitivity"], test["specificity"]
        click.echo(f"test: sensitivity {sens['estimate']:.3f} [{sens['low']:.3f}, {sens['high']:.3f}], specificity "
                   f"{spec['estimate']:.3f} [{spec['low']:.3f}, {spec['high']:.3f}] (n={test['n']}, "
                   f"{test['n_malignant']} malignant, {test['n_patients']} patients; 95% patient bootstrap)")
    top, entropy = config.uncertainty_top_probability, config.uncertainty_entropy
    if top is None or entropy is None:
        click.echo(f"uncertainty: no cut reaches {target_accuracy:.0%} accuracy on validation; every result is "
                   "marked unsure")
    else:
        flagged = config.calibration["uncertainty_validation"]["flagged_fraction"]
        click.echo(f"uncertainty: unsure when top probability < {top:.3f} or normalised entropy > {entropy:.3f} "
                   f"({flagged:.0%} of validation flagged)")
