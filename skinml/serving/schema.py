"""The served model's request and response: signature, input example and request validation.

A request is a table with one row per lesion: an ``image`` column (the photo as a base64 PNG or
JPEG string; raw bytes are accepted in-process) and the clinical columns of ``metadata.csv``,
each optional. Clinical values arrive as they appear in ``metadata.csv`` (text such as ``"55"``,
``"True"``, ``"3.0"``) or as JSON numbers and booleans; missing or null values are imputed as in
training, and ``UNK`` is accepted everywhere.

The clinical columns are declared with MLflow's ``Any`` type on purpose: MLflow would otherwise
convert or reject values itself, before :meth:`predict` runs, with messages that do not name the
row. :func:`validate_request` checks everything and raises :class:`RequestError` naming the row
and field; the pyfunc turns that into a 400. It is a pure function of the request, the fitted
preprocessor and the image config, so it is tested without a server.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from skinml.data import schema
from skinml.data.images import DEFAULT_MAX_PIXELS, ImageError
from skinml.data.preprocess import MetadataError, MetadataPreprocessor
from skinml.data.transforms import ImageConfig, prepare_image

IMAGE_COLUMN = "image"
TOP_K_PARAM = "top_k"
DEFAULT_TOP_K = 3
#: Base64 text of one photo is refused above this many decoded bytes (PAD-UFES-20: < 5 MB).
DEFAULT_MAX_IMAGE_BYTES = 20 * 2**20
#: Rows per request; every photo of a request is decoded at once, so this bounds memory.
DEFAULT_MAX_ROWS = 256

#: Response columns besides one probability column per label (named after the label).
LABEL_COLUMN = "label"
LABEL_NAME_COLUMN = "label_name"
PROBABILITY_COLUMN = "probability"
TOP_LABELS_COLUMN = "top_labels"
TOP_PROBABILITIES_COLUMN = "top_probabilities"
WARNINGS_COLUMN = "warnings"

_DATA_URI = re.compile(r"^data:[\w.+/-]*;base64,", re.IGNORECASE)


class RequestError(ValueError):
    """A request the model cannot score; the message names the row and field."""

    def __init__(self, message: str, row: Any = None, field: str | None = None):
        super().__init__(message)
        self.row = row
        self.field = field


@dataclass(frozen=True)
class ServingLimits:
    """Limits that protect the server; fixed at registration, overridable at load time."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_rows: int = DEFAULT_MAX_ROWS

    def to_dict(self) -> dict[str, int]:
        return {"max_pixels": self.max_pixels, "max_image_bytes": self.max_image_bytes, "max_rows": self.max_rows}

    @classmethod
    def from_dict(cls, state: dict[str, Any] | None) -> ServingLimits:
        state = state or {}
        defaults = cls()
        keys = ("max_pixels", "max_image_bytes", "max_rows")
        return cls(**{k: int(state.get(k, getattr(defaults, k))) for k in keys})


@dataclass
class ValidRequest:
    """A request that passed validation, ready for the model."""

    index: pd.Index
    images: torch.Tensor | None  # (N, 3, S, S) float, the evaluation transform applied
    metadata: np.ndarray  # (N, F) float32, from the fitted preprocessor
    warnings: list[list[str]]  # per row: unknown categories, scored as unknown


# -- signature ----------------------------------------------------------------------------


def clinical_columns(preprocessor: MetadataPreprocessor) -> list[str]:
    """The clinical columns a request may carry: those the fitted preprocessor reads."""
    return list(preprocessor.input_columns)


def model_signature(preprocessor: MetadataPreprocessor, uses_images: bool = True, labels=schema.LABELS):
    """Explicit MLflow signature: ``image`` (required string), clinical columns (optional, Any),
    the ``top_k`` parameter, and the response columns."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema

    inputs = [ColSpec(DataType.string, IMAGE_COLUMN, required=uses_images)]
    inputs += [ColSpec(AnyType(), column, required=False) for column in clinical_columns(preprocessor)]
    outputs = [
        ColSpec(DataType.string, LABEL_COLUMN),
        ColSpec(DataType.string, LABEL_NAME_COLUMN),
        ColSpec(DataType.double, PROBABILITY_COLUMN),
        *[ColSpec(DataType.double, label) for label in labels],
        ColSpec(Array(DataType.string), TOP_LABELS_COLUMN),
        ColSpec(Array(DataType.double), TOP_PROBABILITIES_COLUMN),
        ColSpec(Array(DataType.string), WARNINGS_COLUMN, required=False),
    ]
    params = ParamSchema([ParamSpec(TOP_K_PARAM, DataType.long, DEFAULT_TOP_K)])
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs), params=params)


def example_photo(size: int = 32) -> bytes:
    """A small PNG (skin-coloured background, dark round lesion) for input examples and docs."""
    from PIL import Image

    yy, xx = np.mgrid[:size, :size]
    lesion = np.hypot(yy - size / 2, xx - size / 2) < size / 4
    pixels = np.empty((size, size, 3), dtype=np.uint8)
    pixels[:] = (224, 180, 150)
    pixels[lesion] = (110, 60, 40)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def input_example(preprocessor: MetadataPreprocessor, photo: bytes | None = None) -> pd.DataFrame:
    """One request row: a photo plus a few clinical fields as written in ``metadata.csv``; the
    fields left out are imputed, which the example shows too."""
    row: dict[str, Any] = {IMAGE_COLUMN: base64.b64encode(photo or example_photo()).decode("ascii")}
    wanted = {"age": "55", "gender": "FEMALE", "region": "BACK", "fitspatrick": "2.0", "smoke": "False",
              "diameter_1": "6.0", "diameter_2": "5.0", "itch": "True", "grew": "UNK", "bleed": "False"}
    columns = set(clinical_columns(preprocessor))
    row.update({k: v for k, v in wanted.items() if k in columns})
    return pd.DataFrame([row])


# -- validation ---------------------------------------------------------------------------


def _decode_image_field(value: Any, row: Any, limits: ServingLimits) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):  # in-process callers may pass raw bytes
        data = bytes(value)
    elif schema.is_missing(value):
        raise RequestError(
            f"row {row}: field '{IMAGE_COLUMN}' is missing; send the photo as a base64-encoded PNG or JPEG string",
            row, IMAGE_COLUMN,
        )
    elif not isinstance(value, str):
        raise RequestError(
            f"row {row}: field '{IMAGE_COLUMN}' must be a base64 string, got {type(value).__name__} {value!r:.40}",
            row, IMAGE_COLUMN,
        )
    else:
        text = "".join(_DATA_URI.sub("", value.strip()).split())  # `base64` wraps lines; data: URIs
        # Decoded size is 3/4 of the text: refuse oversized payloads before decoding them.
        if len(text) * 3 // 4 > limits.max_image_bytes:
            raise RequestError(
                f"row {row}: field '{IMAGE_COLUMN}' holds about {len(text) * 3 // 4:,} bytes, above the limit of "
                f"{limits.max_image_bytes:,}", row, IMAGE_COLUMN,
            )
        try:
            urlsafe = "-" in text or "_" in text  # the URL-safe alphabet is accepted too
            data = base64.b64decode(text, altchars=b"-_" if urlsafe else None, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RequestError(
                f"row {row}: field '{IMAGE_COLUMN}' is not valid base64 ({exc}); encode the PNG/JPEG file "
                "with standard base64", row, IMAGE_COLUMN,
            ) from None
    if not data:
        raise RequestError(f"row {row}: field '{IMAGE_COLUMN}' is empty", row, IMAGE_COLUMN)
    if len(data) > limits.max_image_bytes:
        raise RequestError(
            f"row {row}: field '{IMAGE_COLUMN}' holds {len(data):,} bytes, above the limit of "
            f"{limits.max_image_bytes:,}",
            row, IMAGE_COLUMN,
        )
    return data


def _as_frame(request: Any) -> pd.DataFrame:
    if isinstance(request, pd.DataFrame):
        return request
    if isinstance(request, dict):
        try:  # {"image": [...], "age": [...]} or a single row {"image": "...", "age": 55}
            columnar = any(isinstance(v, (list, tuple, np.ndarray, pd.Series)) for v in request.values())
            return pd.DataFrame(request) if columnar else pd.DataFrame([request])
        except ValueError as exc:
            raise RequestError(f"request columns must all have the same length ({exc})") from None
    if isinstance(request, (list, tuple)) and all(isinstance(r, dict) for r in request):
        return pd.DataFrame(list(request))
    raise RequestError(f"request must be a table of rows (DataFrame or records), got {type(request).__name__}")


def normalise_clinical(frame: pd.DataFrame, preprocessor: MetadataPreprocessor) -> pd.DataFrame:
    """Clinical columns only, with ``UNK`` turned into "missing" where it is not a category.

    ``UNK`` is a category of its own where the data has it (``itch``, countries...); elsewhere
    (age, smoke, region...) a client sending ``UNK`` means "not known", which is imputed like a
    missing value rather than scored as an unseen category.
    """
    columns = [c for c in clinical_columns(preprocessor) if c in frame.columns]
    clinical = frame[columns].astype(object).copy()
    for column in columns:
        vocabulary = set(preprocessor.vocabularies_.get(column, ())) | set(schema.VOCABULARIES.get(column, ()))
        if schema.UNKNOWN_TOKEN in vocabulary:
            continue
        is_unk = clinical[column].map(lambda v: isinstance(v, str) and v.strip().upper() == schema.UNKNOWN_TOKEN)
        clinical.loc[is_unk, column] = None
    return clinical


def unknown_value_warnings(clinical: pd.DataFrame, preprocessor: MetadataPreprocessor) -> dict[Any, list[str]]:
    """Per row, one warning for each category the model never saw (it is scored as "unknown")."""
    found: dict[Any, list[str]] = {}
    for row, column, value in preprocessor.unseen_values(clinical):
        documented = schema.VOCABULARIES.get(column, ())
        if value in documented:
            why = "was not seen in training"
        else:
            why = f"is not a known value (expected one of {', '.join(documented)})" if documented else "is unknown"
        found.setdefault(row, []).append(f"row {row}: {column}={value!r} {why}; scored as unknown")
    return found


def validate_request(
    request: Any,
    preprocessor: MetadataPreprocessor,
    image_config: ImageConfig | None,
    limits: ServingLimits | None = None,
) -> ValidRequest:
    """Check and encode a request; raises :class:`RequestError` naming the row and field.

    Images go through :func:`skinml.data.transforms.prepare_image`, the evaluation transform,
    so served probabilities equal evaluation's. ``image_config=None`` (metadata-only models)
    ignores the ``image`` column.
    """
    limits = limits or ServingLimits()
    frame = _as_frame(request)
    if len(frame) == 0:
        raise RequestError("empty request: it has no rows; send at least one row with an 'image' field")
    if len(frame) > limits.max_rows:
        raise RequestError(f"request has {len(frame)} rows, above the limit of {limits.max_rows}; split it into "
                           "smaller requests")
    if not frame.index.is_unique:
        frame = frame.reset_index(drop=True)

    images = None
    if image_config is not None:
        if IMAGE_COLUMN not in frame.columns:
            raise RequestError(f"request has no '{IMAGE_COLUMN}' field: every row needs the photo as a base64 PNG "
                               "or JPEG string", field=IMAGE_COLUMN)
        config = replace(image_config, max_pixels=limits.max_pixels)
        tensors = []
        for row, value in frame[IMAGE_COLUMN].items():
            data = _decode_image_field(value, row, limits)
            try:
                tensors.append(prepare_image(data, config, name=f"row {row}"))
            except ImageError as exc:
                raise RequestError(f"row {row}: field '{IMAGE_COLUMN}': {exc}", row, IMAGE_COLUMN) from None
        images = torch.stack(tensors)

    clinical = normalise_clinical(frame, preprocessor)
    try:
        metadata = preprocessor.transform(clinical)
    except MetadataError as exc:
        raise RequestError(str(exc), exc.row, exc.column) from None
    warnings = unknown_value_warnings(clinical, preprocessor)
    return ValidRequest(frame.index, images, metadata, [warnings.get(row, []) for row in frame.index])


def validate_top_k(value: Any, num_labels: int = schema.NUM_CLASSES) -> int:
    """The ``top_k`` parameter: a whole number from 1 to the number of labels (default 3)."""
    if value is None:
        return min(DEFAULT_TOP_K, num_labels)
    top_k = None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        top_k = int(value)
    elif isinstance(value, (float, np.floating)) and float(value).is_integer():
        top_k = int(value)
    elif isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        top_k = int(value)
    if top_k is None:
        raise RequestError(f"parameter '{TOP_K_PARAM}' must be a whole number, got {value!r}", field=TOP_K_PARAM)
    if not 1 <= top_k <= num_labels:
        raise RequestError(f"parameter '{TOP_K_PARAM}' must be between 1 and {num_labels}, got {top_k}",
                           field=TOP_K_PARAM)
    return top_k


# -- response -----------------------------------------------------------------------------


def format_predictions(
    probabilities: np.ndarray, labels, index: pd.Index, top_k: int, warnings: list[list[str]] | None = None
) -> pd.DataFrame:
    """One row per request row: label, its name and probability, every class's probability,
    the ``top_k`` labels and probabilities, and warnings."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = list(labels)
    order = np.argsort(-probabilities, axis=1, kind="stable")
    best = order[:, 0]
    out = pd.DataFrame(index=index)
    out[LABEL_COLUMN] = [labels[i] for i in best]
    out[LABEL_NAME_COLUMN] = [schema.LABEL_NAMES.get(labels[i], labels[i]) for i in best]
    out[PROBABILITY_COLUMN] = probabilities[np.arange(len(best)), best]
    for j, label in enumerate(labels):
        out[label] = probabilities[:, j]
    out[TOP_LABELS_COLUMN] = [[labels[i] for i in row[:top_k]] for row in order]
    out[TOP_PROBABILITIES_COLUMN] = [[float(p[i]) for i in row[:top_k]] for p, row in zip(probabilities, order)]
    out[WARNINGS_COLUMN] = warnings if warnings is not None else [[] for _ in range(len(out))]
    return out
