"""The clinician-facing demo page (``skinml app``): a FastAPI app over the registered model.

- :mod:`skinml.app.server`: the app (page, ``/api/predict``, ``/api/schema``, ``/api/health``);
- :mod:`skinml.app.backend`: the model in-process (``mlflow.pyfunc``) or a running ``mlflow models serve``;
- :mod:`skinml.app.questionnaire`: the form, generated from :mod:`skinml.data.schema` (no ``biopsed``);
- :mod:`skinml.app.thresholds`: uncertainty and referral thresholds chosen on validation predictions;
- :mod:`skinml.app.retrieval`: the cited knowledge base (``knowledge/<LABEL>.md``) and TF-IDF retrieval.

:func:`build_app` puts them together; heavy modules are imported inside it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def calibration_from_model(model_uri: str, n_boot: int = 1000):
    """Thresholds from the registered model's training run, when ``skinml evaluate`` logged its
    validation predictions there (``evaluation/val/predictions.csv``); else ``None``."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from skinml import tracking
    from skinml.app.thresholds import calibrate

    prefix = "models:/"
    if not model_uri.startswith(prefix):
        return None
    name, _, ref = model_uri[len(prefix):].partition("@")
    client = MlflowClient()
    try:
        version = (client.get_model_version_by_alias(name, ref) if ref
                   else client.get_model_version(*model_uri[len(prefix):].split("/", 1)))
        run_id = version.tags.get(tracking.TAG_TRAIN_RUN)
        if not run_id:
            return None
        val = tracking.download_artifact(run_id, "evaluation/val/predictions.csv")
    except (MlflowException, OSError, TypeError, ValueError) as exc:
        log.info("no validation predictions for %s (%s); thresholds stay uncalibrated", model_uri, exc)
        return None
    try:
        test = tracking.download_artifact(run_id, "evaluation/test/predictions.csv")
    except (MlflowException, OSError):
        test = None
    return calibrate(val, test, n_boot=n_boot, source=f"training run {run_id} (via {model_uri})")


def build_app(model_uri: str | None = None, model_url: str | None = None, config_path: str | os.PathLike | None = None,
              model: Any = None, max_body_bytes: int | None = None):
    """The FastAPI app over the registered model (in-process) or a model server (``model_url``).

    Thresholds come from ``config_path`` (written by ``skinml app-calibrate``), else from the
    model's training run's validation predictions, else stay uncalibrated (the page says so).
    """
    from skinml.app.backend import LocalPredictor, RemotePredictor
    from skinml.app.server import DEFAULT_MAX_BODY_BYTES, create_app
    from skinml.app.thresholds import AppConfig

    if model_url:
        predictor = RemotePredictor(model_url)
    else:
        predictor = LocalPredictor(model_uri, model=model)
    if config_path:
        config = AppConfig.load(config_path)
    else:
        config = (calibration_from_model(predictor.model_uri) if not model_url else None) or AppConfig()
    if not config.calibrated:
        log.warning("decision thresholds are not calibrated on validation predictions; run `skinml app-calibrate` "
                    "and pass --config")
    return create_app(predictor, config, max_body_bytes=max_body_bytes or DEFAULT_MAX_BODY_BYTES)
