"""Build requests for the served model and score them, in-process or against ``mlflow models serve``.

In-process scoring loads ``models:/<name>@champion`` with ``mlflow.pyfunc.load_model``; remote
scoring posts to ``<url>/invocations``. Both go through the same pyfunc ``predict``, so they
give the same answer.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import math
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from skinml.data import schema
from skinml.serving.schema import (
    IMAGE_COLUMN,
    TOP_K_PARAM,
    TOP_LABELS_COLUMN,
    TOP_PROBABILITIES_COLUMN,
    WARNINGS_COLUMN,
)

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:5000"
DEFAULT_MODEL_NAME = "skin-lesion-classifier"
DEFAULT_ALIAS = "champion"
REQUEST_FORMATS = ("dataframe_split", "dataframe_records")


class ServingError(RuntimeError):
    """The server refused or failed a request; the message is the server's."""

    def __init__(self, message: str, status: int | None = None, error_code: str | None = None):
        super().__init__(message)
        self.status = status
        self.error_code = error_code


# -- building requests --------------------------------------------------------------------


def encode_image(source: str | os.PathLike | bytes) -> str:
    """A photo file (or its bytes) as the base64 text the ``image`` field carries."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    return base64.b64encode(data).decode("ascii")


def build_request(images: list[str | os.PathLike | bytes], clinical: list[Mapping[str, Any]] | None = None,
                  index: list[Any] | None = None, encode: bool = True) -> pd.DataFrame:
    """One row per photo: ``image`` (base64, or raw bytes with ``encode=False``) plus clinical
    fields, unset ones left out (the model imputes them)."""
    clinical = clinical or [{} for _ in images]
    if len(clinical) != len(images):
        raise ValueError(f"{len(images)} images but {len(clinical)} clinical rows")
    rows = []
    for image, fields in zip(images, clinical):
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        row = {IMAGE_COLUMN: encode_image(data) if encode else data}
        row.update({k: v for k, v in fields.items() if not schema.is_missing(v)})
        rows.append(row)
    return pd.DataFrame(rows, index=index)


def _json_value(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if value is pd.NA or value is None:
        return None
    return value


def request_body(frame: pd.DataFrame, request_format: str = "dataframe_split", top_k: int | None = None) -> dict:
    """The JSON body ``/invocations`` expects (missing values as null)."""
    if request_format == "dataframe_split":
        payload: Any = {
            "columns": [str(c) for c in frame.columns],
            "index": [_json_value(i) for i in frame.index],
            "data": [[_json_value(v) for v in row] for row in frame.itertuples(index=False, name=None)],
        }
    elif request_format == "dataframe_records":
        payload = [{str(k): _json_value(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]
    else:
        raise ValueError(f"request_format must be one of {REQUEST_FORMATS}, got {request_format!r}")
    body: dict[str, Any] = {request_format: payload}
    if top_k is not None:
        body["params"] = {TOP_K_PARAM: int(top_k)}
    return body


# -- scoring ------------------------------------------------------------------------------


class _NoDelay:
    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[attr-defined]


class _NoDelayHTTPConnection(_NoDelay, http.client.HTTPConnection):
    pass


class _NoDelayHTTPSConnection(_NoDelay, http.client.HTTPSConnection):
    pass


class _NoDelayHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_NoDelayHTTPConnection, req)


class _NoDelayHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_NoDelayHTTPSConnection, req, context=self._context)


#: urllib with Nagle's algorithm off, as curl and urllib3 do: http.client sends a body above
#: 2,920 bytes in a second write after the headers, which with Nagle on can wait for the server's
#: delayed ACK. (On loopback to ``mlflow models serve`` no difference was measured; over a
#: network it is the usual precaution.)
_OPENER = urllib.request.build_opener(_NoDelayHTTPHandler, _NoDelayHTTPSHandler)


def open_url(request: urllib.request.Request | str, timeout: float):
    """``urllib.request.urlopen`` without the Nagle delay."""
    return _OPENER.open(request, timeout=timeout)


def post_json(url: str, body: Any, timeout: float = 120.0) -> tuple[int, Any]:
    """POST JSON; returns (status, parsed body or raw text), HTTP errors included."""
    data = json.dumps(body).encode("utf-8")
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with open_url(request, timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    text = raw.decode("utf-8", errors="replace")
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:  # e.g. a gateway timeout page
        return status, text


def predict_remote(url: str, frame: pd.DataFrame, top_k: int | None = None, request_format: str = "dataframe_split",
                   timeout: float = 120.0) -> pd.DataFrame:
    """Score ``frame`` on a running ``mlflow models serve``; raises :class:`ServingError`."""
    endpoint = url.rstrip("/") + ("" if url.rstrip("/").endswith("/invocations") else "/invocations")
    try:
        status, answer = post_json(endpoint, request_body(frame, request_format, top_k), timeout)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ServingError(f"cannot reach the model server at {endpoint}: {reason}; start it with `mlflow models "
                           f"serve -m \"{model_uri_for()}\" --env-manager local`") from exc
    if status != 200:
        if isinstance(answer, dict):
            raise ServingError(answer.get("message", str(answer)), status, answer.get("error_code"))
        raise ServingError(f"HTTP {status}: {str(answer)[:500]}", status)
    predictions = pd.DataFrame(answer["predictions"])
    if len(predictions) == len(frame):
        predictions.index = frame.index
    return predictions


def model_uri_for(name: str = DEFAULT_MODEL_NAME, alias: str = DEFAULT_ALIAS) -> str:
    return f"models:/{name}@{alias}"


def load_model(model_uri: str | None = None, model_config: dict[str, Any] | None = None):
    """Load the registered model (default ``models:/skin-lesion-classifier@champion``)."""
    import mlflow

    from skinml import tracking

    tracking.setup_tracking()
    return mlflow.pyfunc.load_model(model_uri or model_uri_for(), model_config=model_config)


def request_fields(model=None) -> list[str]:
    """The columns a request may carry: ``image`` and the clinical fields ``model`` (a loaded
    pyfunc) reads; without a model, those of the default preprocessor.

    The signature does not list them (see :mod:`skinml.serving.schema`), so they come from the
    model's own preprocessor.
    """
    from skinml.data.preprocess import MetadataPreprocessor
    from skinml.serving.schema import request_columns

    preprocessor = MetadataPreprocessor()
    if model is not None:
        preprocessor = model.unwrap_python_model().bundle.preprocessor
    return request_columns(preprocessor)


def predict_local(model, frame: pd.DataFrame, top_k: int | None = None) -> pd.DataFrame:
    """Score ``frame`` with a loaded pyfunc model; bad input raises ``MlflowException``."""
    return model.predict(frame, params={TOP_K_PARAM: int(top_k)} if top_k is not None else None)


def score_folder(data_dir: str | os.PathLike | None, model=None, url: str | None = None, batch_size: int = 32,
                 top_k: int | None = None, drop_missing_images: bool = False) -> pd.DataFrame:
    """Score every row of a PAD-UFES-20-shaped folder (``metadata.csv`` + photos) in batches.

    Uses ``url`` when given, else ``model`` (a loaded pyfunc; default the champion). Rows are
    indexed by ``img_id``, so an error names the image. Returns identifiers, the true diagnosis
    when the metadata has one, and the model's answer.
    """
    from skinml.data.source import load_metadata

    frame = load_metadata(data_dir, drop_missing_images=drop_missing_images)
    if url is None and model is None:
        model = load_model()
    # Send only what the model reads: it refuses unknown columns. A remote model's own fields are
    # not known here; a field it reads that is not sent shows up in the answer's warnings.
    accepted = set(request_fields(model if url is None else None))
    clinical_columns = [c for c in schema.FEATURES if c in frame.columns and c in accepted]
    parts = []
    start_time = time.perf_counter()
    for start in range(0, len(frame), batch_size):
        batch = frame.iloc[start:start + batch_size]
        request = build_request(list(batch["image_path"]), batch[clinical_columns].to_dict(orient="records"),
                                index=list(batch[schema.IMAGE_ID]), encode=url is not None)
        if url is not None:
            parts.append(predict_remote(url, request, top_k))
        else:
            parts.append(predict_local(model, request, top_k))
        log.info("scored %d/%d rows", min(start + batch_size, len(frame)), len(frame))
    predictions = pd.concat(parts) if parts else pd.DataFrame()
    ids = frame[[schema.IMAGE_ID, schema.PATIENT_ID, schema.LESION_ID]].reset_index(drop=True)
    if schema.TARGET in frame.columns:
        ids["true_label"] = frame[schema.TARGET].to_numpy()
    predictions = predictions.reset_index(drop=True)
    # One value per cell, for CSV: lists become "|"-joined text; the per-class columns keep every probability.
    for column, sep in ((TOP_LABELS_COLUMN, "|"), (WARNINGS_COLUMN, "; ")):
        if column in predictions.columns:
            predictions[column] = predictions[column].map(
                lambda v, sep=sep: sep.join(map(str, v)) if isinstance(v, (list, tuple, np.ndarray)) else (v or ""))
    predictions = predictions.drop(columns=[TOP_PROBABILITIES_COLUMN], errors="ignore")
    out = pd.concat([ids, predictions], axis=1)
    out.attrs["seconds"] = time.perf_counter() - start_time
    return out
