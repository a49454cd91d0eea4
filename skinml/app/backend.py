"""Where the page's predictions come from: the registered pyfunc in-process, or a running
``mlflow models serve``. Both run the same ``SkinLesionClassifier.predict``, so the page shows
what the served model answers, refusals included.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from typing import Any

import numpy as np
import pandas as pd

from skinml.data import schema
from skinml.serving.schema import IMAGE_COLUMN, TOP_K_PARAM, WARNINGS_COLUMN

log = logging.getLogger(__name__)

EXPLAIN_PARAM = "explain"
EXPLANATION_COLUMN = "explanation"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# "row 0, field 'age': ...", "row 0: field 'image' is ...", "row 0: age must be ...", "parameter 'top_k' ..."
_FIELD_PATTERNS = (
    re.compile(r"\bfield '(?P<field>[A-Za-z_0-9]+)'"),
    re.compile(r"\bparameter '(?P<field>[A-Za-z_0-9]+)'"),
    re.compile(r"^row [^:,]+[:,]\s*(?P<field>[a-z_0-9]+)(?:=|\s+must\b|\s+is\b)"),
)


class PredictionError(Exception):
    """The model refused the request (status 400) or could not answer (status 502/500)."""

    def __init__(self, message: str, status: int = 400, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.field = field


def field_of(message: str, known: set[str] | None = None) -> str | None:
    """The field a model error message names, if it names one we know."""
    for pattern in _FIELD_PATTERNS:
        match = pattern.search(message)
        if match and (known is None or match["field"] in known):
            return match["field"]
    return None


def _plain(value: Any) -> Any:
    """JSON-ready copy of a model output cell (numpy arrays and scalars to Python)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


def parse_explanation(value: Any) -> dict[str, Any] | None:
    """The served model's ``explanation`` cell, checked: only known keys, a real PNG overlay,
    contributions as plain records. Anything else is dropped (the page then shows no heatmap)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    try:
        data = json.loads(value) if isinstance(value, str) else dict(value)
    except (TypeError, ValueError):
        log.warning("ignoring an explanation that is not JSON")
        return None
    out: dict[str, Any] = {}
    overlay = data.get("overlay_png_base64")
    if isinstance(overlay, str):
        try:
            if base64.b64decode(overlay, validate=True)[:8] == PNG_SIGNATURE:
                out["overlay_png_base64"] = overlay
        except (binascii.Error, ValueError):
            log.warning("ignoring an explanation overlay that is not base64")
    contributions = []
    for item in data.get("metadata_contributions") or []:
        if not isinstance(item, dict):
            continue
        try:
            contribution = float(item.get("contribution"))
        except (TypeError, ValueError):
            continue
        contributions.append({"field": str(item.get("field", "")), "value": _plain(item.get("value")),
                              "contribution": contribution, "towards": str(item.get("towards", ""))})
    if contributions:
        out["metadata_contributions"] = contributions
    for key in ("baseline", "method", "target"):
        if isinstance(data.get(key), str):
            out[key] = data[key]
    if isinstance(data.get("baseline_probability"), (int, float)):
        out["baseline_probability"] = float(data["baseline_probability"])
    if isinstance(data.get("warnings"), list):
        out["warnings"] = [str(w) for w in data["warnings"]]
    # The raw heatmap grids and extra attention overlays are left out: the page shows one overlay.
    return out or None


def result_row(row: dict[str, Any]) -> dict[str, Any]:
    """One model output row as plain JSON (probabilities, top labels, warnings, explanation)."""
    out = {key: _plain(value) for key, value in row.items() if key != EXPLANATION_COLUMN}
    out[WARNINGS_COLUMN] = [str(w) for w in (out.get(WARNINGS_COLUMN) or [])]
    out[EXPLANATION_COLUMN] = parse_explanation(row.get(EXPLANATION_COLUMN))
    return out


class LocalPredictor:
    """The registered model loaded in this process with ``mlflow.pyfunc``."""

    mode = "in-process"

    def __init__(self, model_uri: str | None = None, model=None):
        from skinml.serving import client

        self.model_uri = model_uri or client.model_uri_for()
        self.model = model if model is not None else client.load_model(self.model_uri)
        self.input_fields = self._clinical_fields()
        signature = self.model.metadata.signature
        params = signature.params if signature is not None and signature.params is not None else None
        self.param_names = {p.name for p in params.params} if params is not None else set()

    def _clinical_fields(self) -> list[str]:
        """The clinical columns the model reads (from its own preprocessor: the signature does
        not list them, so that the model can see and refuse misspelled columns)."""
        from skinml.serving import client

        return [c for c in client.request_fields(self.model) if c != IMAGE_COLUMN]

    @property
    def supports_explain(self) -> bool:
        return EXPLAIN_PARAM in self.param_names

    @property
    def target(self) -> str:
        return self.model_uri

    def predict(self, frame: pd.DataFrame, top_k: Any, explain: bool) -> dict[str, Any]:
        from mlflow.exceptions import MlflowException

        params: dict[str, Any] = {TOP_K_PARAM: top_k}
        if explain and self.supports_explain:
            params[EXPLAIN_PARAM] = True
        try:
            answer = self.model.predict(frame, params=params)
        except MlflowException as exc:
            raise PredictionError(str(exc.message), 400) from None
        return result_row(answer.iloc[0].to_dict())

    def health(self) -> dict[str, Any]:
        return {"status": "ok"}


class RemotePredictor:
    """Forwards to a running ``mlflow models serve`` at ``url``."""

    mode = "remote"

    def __init__(self, url: str, timeout: float = 120.0, input_fields: list[str] | None = None):
        from skinml.data.preprocess import MetadataPreprocessor

        self.url = url.rstrip("/")
        self.timeout = timeout
        # The server does not publish its signature; the default preprocessor's columns are the
        # fields a default-trained model reads (the server drops any others with a log line).
        self.input_fields = list(input_fields or MetadataPreprocessor().input_columns)
        self.supports_explain = True  # unknown params are ignored by the server with a warning

    @property
    def target(self) -> str:
        return self.url

    def predict(self, frame: pd.DataFrame, top_k: Any, explain: bool) -> dict[str, Any]:
        import urllib.error

        from skinml.serving import client

        body = client.request_body(frame, "dataframe_split")
        body["params"] = {TOP_K_PARAM: top_k}  # as given: the model validates it and names it in a 400
        if explain:
            body["params"][EXPLAIN_PARAM] = True
        endpoint = self.url + ("" if self.url.endswith("/invocations") else "/invocations")
        try:
            status, answer = client.post_json(endpoint, body, self.timeout)
        except (urllib.error.URLError, OSError) as exc:
            raise PredictionError(f"cannot reach the model server at {endpoint}: {getattr(exc, 'reason', exc)}",
                                  502) from None
        if status != 200:
            message = answer.get("message", str(answer)) if isinstance(answer, dict) else f"HTTP {status}"
            raise PredictionError(str(message), 400 if status == 400 else 502)
        predictions = answer.get("predictions") if isinstance(answer, dict) else None
        if not predictions:
            raise PredictionError(f"the model server at {endpoint} answered without predictions", 502)
        return result_row(predictions[0])

    def health(self) -> dict[str, Any]:
        import urllib.error
        import urllib.request

        base = self.url.removesuffix("/invocations")
        try:
            with urllib.request.urlopen(base + "/ping", timeout=5) as response:
                ok = response.status == 200
        except (urllib.error.URLError, OSError):
            ok = False
        return {"status": "ok" if ok else "model server unreachable"}


def request_frame(image_b64: str, answers: dict[str, Any]) -> pd.DataFrame:
    """The one-row request the served model expects: the photo as base64 plus the answers."""
    return pd.DataFrame([{IMAGE_COLUMN: image_b64, **answers}])


def known_fields(input_fields: list[str]) -> set[str]:
    return {IMAGE_COLUMN, TOP_K_PARAM, *input_fields, *schema.FEATURES}
