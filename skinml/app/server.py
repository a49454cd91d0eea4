"""The FastAPI app: the page, its JSON API and an offline API reference.

- ``GET /`` the page (static HTML, JS and CSS shipped in the package; no CDN).
- ``GET /api/schema`` the questionnaire, label names and the decision thresholds.
- ``POST /api/predict`` a photo and answers (multipart form, or JSON with a base64 photo) ->
  probabilities, top 3, uncertainty note, referral advice, imputed fields, warnings, the
  explanation when the model gives one, and cited notes. A request the model refuses gets the
  model's own 400 message plus the field it names.
- ``GET /api/health``, ``GET /openapi.json``, ``GET /api`` (the API reference, offline).

The photo is never written anywhere: multipart bodies are parsed in memory (no temporary files)
and the bytes are dropped after the model has answered. Bodies above ``max_body_bytes`` are
refused with a 413 before they are read in full.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import json
import logging
import urllib.parse
from importlib import resources
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import HTTPException
from fastapi.responses import JSONResponse, Response

from skinml.app import questionnaire
from skinml.app.backend import PredictionError, field_of, known_fields, request_frame
from skinml.app.thresholds import AppConfig, is_uncertain, malignant_score, normalised_entropy
from skinml.data import schema
from skinml.serving.schema import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_TOP_K, IMAGE_COLUMN

log = logging.getLogger(__name__)

#: A base64 photo at the model's own byte limit, plus room for the form fields.
DEFAULT_MAX_BODY_BYTES = DEFAULT_MAX_IMAGE_BYTES * 4 // 3 + 2**20
NOTICE = "Research tool, not a medical device. It does not diagnose; a clinician examines the lesion."
NO_GENERATED_TEXT = ("No text is generated: the notes below are passages written in advance for each "
                     "condition and chosen by keyword ranking (TF-IDF), each with its sources.")
STATIC_FILES = {"app.js": "text/javascript", "app.css": "text/css", "api.js": "text/javascript"}
SECURITY_HEADERS = {
    # Only our own files run; inline scripts and event handlers (onerror=...) are refused.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; "
                               "style-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body above the limit of {limit:,} bytes")


class BodyLimitMiddleware:
    """Refuse bodies above ``max_bytes``: at once by Content-Length, else while reading."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse({"error": BodyTooLarge(self.max_bytes).detail, "field": None}, 413)
            return await response(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)  # an HTTPException: FastAPI answers 413
            return message

        return await self.app(scope, limited, send)


def _static(name: str) -> bytes:
    return resources.files("skinml.app").joinpath("static", name).read_bytes()


def parse_multipart(body: bytes, content_type: str) -> tuple[bytes | None, dict[str, str]]:
    """(photo bytes, text fields) of a multipart/form-data body, parsed in memory only."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise PredictionError("the multipart body could not be read; send the photo as form field 'image'", 400,
                              IMAGE_COLUMN)
    photo, fields = None, {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        payload = part.get_payload(decode=True) or b""
        if name == IMAGE_COLUMN and part.get_filename() is not None:
            photo = payload
        else:
            fields[name] = payload.decode(part.get_content_charset() or "utf-8", errors="replace")
    return photo, fields


def _bool_field(value: Any, name: str, default: bool) -> bool:
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise PredictionError(f"field '{name}' must be true or false, got {value!r}", 400, name)


def _top_k(value: Any) -> int:
    if value is None or (isinstance(value, str) and not value.strip()):
        return DEFAULT_TOP_K
    try:
        return int(value)
    except (TypeError, ValueError):
        # The model validates top_k itself and answers with its own message.
        return value  # type: ignore[return-value]


def interpret(row: dict[str, Any], config: AppConfig) -> dict[str, Any]:
    """Uncertainty note and referral advice for one model answer, from the stored thresholds."""
    probabilities = {label: float(row[label]) for label in schema.LABELS}
    vector = np.array([[probabilities[label] for label in schema.LABELS]])
    top = float(vector.max())
    entropy = float(normalised_entropy(vector)[0])
    unsure = bool(is_uncertain(top, entropy, config.uncertainty_top_probability, config.uncertainty_entropy))
    reasons = []
    if config.uncertainty_top_probability is None or config.uncertainty_entropy is None:
        reasons.append("no threshold reached the target accuracy on validation, so every result is marked unsure")
    else:
        if top < config.uncertainty_top_probability:
            reasons.append(f"top probability {top:.2f} is below {config.uncertainty_top_probability:.2f}")
        if entropy > config.uncertainty_entropy:
            reasons.append(f"spread over the classes (normalised entropy {entropy:.2f}) is above "
                           f"{config.uncertainty_entropy:.2f}")
    uncertainty = {
        "uncertain": unsure, "top_probability": top, "entropy": entropy, "reasons": reasons,
        "top_probability_threshold": config.uncertainty_top_probability,
        "entropy_threshold": config.uncertainty_entropy, "calibrated": config.calibrated,
        "message": ("The model is unsure about this photo: treat the ranking below as weak." if unsure
                    else "The model is not flagged as unsure, which does not make it right."),
    }
    score = malignant_score(probabilities)
    threshold = config.referral_threshold
    if threshold is None:
        referral = {"refer": None, "malignant_probability": score, "threshold": None,
                    "message": "No referral threshold is calibrated for this model (run `skinml app-calibrate`); "
                               "no referral advice is given."}
    else:
        refer = score >= threshold
        referral = {
            "refer": bool(refer), "malignant_probability": score, "threshold": threshold,
            "target_sensitivity": config.target_sensitivity,
            "message": ("See a dermatologist soon: the summed probability of basal cell carcinoma, squamous "
                        f"cell carcinoma and melanoma ({score:.2f}) reaches the referral threshold "
                        f"({threshold:.2f})." if refer else
                        f"The summed probability of skin cancer ({score:.2f}) is below the referral threshold "
                        f"({threshold:.2f}). That does not rule cancer out: a lesion that changes, bleeds or "
                        "worries the patient should be examined."),
        }
    return {"uncertainty": uncertainty, "referral": referral}


def create_app(predictor, config: AppConfig | None = None, index=None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The app over ``predictor`` (:class:`~skinml.app.backend.LocalPredictor` or ``RemotePredictor``)."""
    from skinml.app.retrieval import default_index

    config = config or AppConfig()
    index = index or default_index()
    fields = [c for c in predictor.input_fields if c not in questionnaire.NEVER_ASKED]
    known = known_fields(fields)
    form = questionnaire.questionnaire(fields)
    app = FastAPI(title="skinml demo", version="1", docs_url=None, redoc_url=None,
                  description="Photo + questionnaire in; the registered skin-lesion model's probabilities, "
                              "referral advice and cited notes out. " + NOTICE)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException):
        return JSONResponse({"error": str(exc.detail), "field": None}, exc.status_code)

    @app.exception_handler(PredictionError)
    async def prediction_error(_request: Request, exc: PredictionError):
        field = exc.field or field_of(exc.message, known)
        return JSONResponse({"error": exc.message, "field": field}, exc.status)

    @app.get("/", include_in_schema=False)
    def page() -> Response:
        return Response(_static("index.html"), media_type="text/html; charset=utf-8")

    @app.get("/api", include_in_schema=False)
    def api_reference() -> Response:
        return Response(_static("api.html"), media_type="text/html; charset=utf-8")

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in STATIC_FILES:
            raise HTTPException(404, f"no static file {name!r}")
        return Response(_static(name), media_type=f"{STATIC_FILES[name]}; charset=utf-8")

    @app.get("/api/health", summary="Is the model loaded (or the model server reachable)?")
    def health() -> dict[str, Any]:
        return {**predictor.health(), "mode": predictor.mode, "model": predictor.target,
                "explain": bool(predictor.supports_explain), "calibrated": config.calibrated}

    @app.get("/api/schema", summary="The questionnaire (every field optional), label names and thresholds")
    def api_schema() -> dict[str, Any]:
        return {**form, "notice": NOTICE, "no_generated_text": NO_GENERATED_TEXT,
                "image": {"field": IMAGE_COLUMN, "formats": ["PNG", "JPEG"], "max_body_bytes": max_body_bytes},
                "decision": {"uncertainty_top_probability": config.uncertainty_top_probability,
                             "uncertainty_entropy": config.uncertainty_entropy,
                             "referral_threshold": config.referral_threshold,
                             "target_sensitivity": config.target_sensitivity,
                             "target_accuracy": config.target_accuracy, "calibrated": config.calibrated,
                             "calibration": config.calibration}}

    predict_doc = {
        "requestBody": {"required": True, "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                IMAGE_COLUMN: {"type": "string", "format": "binary"},
                **{f["name"]: {"type": "string"} for f in form["fields"]},
                "explain": {"type": "boolean"}, "top_k": {"type": "integer"}}}},
            "application/json": {"schema": {"type": "object", "properties": {
                IMAGE_COLUMN: {"type": "string", "description": "base64 PNG or JPEG"},
                "fields": {"type": "object", "description": "answers by field name, as in metadata.csv"},
                "explain": {"type": "boolean"}, "top_k": {"type": "integer"}}}}}},
        "responses": {"400": {"description": "the model refused the request: {error, field}"},
                      "413": {"description": "body too large"}},
    }

    @app.post("/api/predict", summary="Score a photo and its answers", openapi_extra=predict_doc)
    async def predict(request: Request) -> dict[str, Any]:
        content_type = request.headers.get("content-type", "")
        body = await request.body()
        if content_type.startswith("multipart/form-data"):
            photo, raw = parse_multipart(body, content_type)
            image_b64 = base64.b64encode(photo).decode("ascii") if photo else None
            options = {k: raw.pop(k, None) for k in ("explain", "top_k")}
        elif content_type.startswith("application/x-www-form-urlencoded"):  # answers only, or a base64 photo
            raw = dict(urllib.parse.parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True))
            image_b64 = raw.pop(IMAGE_COLUMN, None)
            options = {k: raw.pop(k, None) for k in ("explain", "top_k")}
        elif content_type.startswith("application/json"):
            try:
                data = json.loads(body)
            except ValueError as exc:
                raise PredictionError(f"the request body is not valid JSON ({exc})", 400) from None
            if not isinstance(data, dict):
                raise PredictionError("the JSON body must be an object with 'image' and 'fields'", 400)
            image_b64 = data.get(IMAGE_COLUMN)
            raw = data.get("fields") if isinstance(data.get("fields"), dict) else {
                k: v for k, v in data.items() if k not in (IMAGE_COLUMN, "explain", "top_k", "fields")}
            options = {"explain": data.get("explain"), "top_k": data.get("top_k")}
        else:
            raise PredictionError("send multipart/form-data (photo as field 'image') or application/json "
                                  f"(base64 photo as 'image'), not {content_type or 'no content type'!r}", 415)
        del body
        explain = _bool_field(options["explain"], "explain", True)
        top_k = _top_k(options["top_k"])
        proxies = sorted(set(raw) & set(schema.LABEL_PROXY_FEATURES))
        if proxies:
            raise PredictionError(f"field '{proxies[0]}' is not asked: it is a label proxy (every skin cancer in the "
                                  "training data was biopsied) and is unknown when a lesion is first seen", 400,
                                  proxies[0])
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            # The scoring server would drop them silently; a misspelt field must not become "missing".
            raise PredictionError(f"field '{unknown[0]}' is not a question of this model (fields: "
                                  f"{', '.join(fields)})", 400, unknown[0])
        answers = questionnaire.clean_answers(raw, fields)
        if image_b64 is not None and not isinstance(image_b64, str):
            raise PredictionError(f"row 0: field '{IMAGE_COLUMN}' must be a base64 string", 400, IMAGE_COLUMN)
        row = predictor.predict(request_frame(image_b64, answers), top_k, explain)
        image_b64 = None  # the photo is not kept beyond the model call
        labels = row.get("top_labels") or [row["label"]]
        top = [{"label": label, "name": schema.LABEL_NAMES.get(label, label), "probability": float(row[label]),
                "malignant": label in schema.MALIGNANT_LABELS} for label in labels]
        probabilities = {label: float(row[label]) for label in schema.LABELS}
        return {
            "label": row["label"], "label_name": row.get("label_name") or schema.LABEL_NAMES[row["label"]],
            "probability": float(row["probability"]), "probabilities": probabilities, "top": top,
            **interpret(row, config),
            "imputed_fields": questionnaire.imputed_fields(answers, fields),
            "answered_fields": sorted(answers),
            "warnings": row.get("warnings") or [],
            "explanation": row.get("explanation"),
            "notes": index.notes_for(probabilities, answers),
            "notice": NOTICE, "no_generated_text": NO_GENERATED_TEXT,
            "model": predictor.target,
        }

    return app

