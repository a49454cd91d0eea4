"""The served model's request and response: signature, input example and request validation.

A request is a table with one row per lesion: an ``image`` column (the photo as a base64 PNG or
JPEG string; raw bytes are accepted in-process) and the clinical columns of ``metadata.csv``,
each optional. Clinical values arrive as they appear in ``metadata.csv`` (text such as ``"55"``,
``"True"``, ``"3.0"``) or as JSON numbers and booleans; missing or null values are imputed as in
training, and ``UNK`` is accepted everywhere.

The signature declares no input columns on purpose (outputs and parameters only): with named
input columns MLflow's schema enforcement drops every column it does not know before
:meth:`predict` runs, so a misspelled ``Age`` or ``fitzpatrick`` would silently be imputed; and it
would convert or reject values itself with messages that do not name the row. The request
columns are documented by :func:`request_columns` and the logged input example instead.
:func:`validate_request` checks everything and raises :class:`RequestError` whose message starts
with the row and field (``row 0, field 'age': ...``); the pyfunc turns that into a 400. Unknown
columns are refused (naming the closest valid name) unless ``params={"allow_extra_columns": true}``;
every clinical field that was imputed is listed in the row's ``warnings``. It is a pure function
of the request, the fitted preprocessor and the image config, so it is tested without a server.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import io
import math
import re
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from skinml.data import schema
from skinml.data.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, ImageError, check_image
from skinml.data.preprocess import ColumnTable, MetadataError, MetadataPreprocessor
from skinml.data.transforms import ImageConfig, prepare_image

IMAGE_COLUMN = "image"
TOP_K_PARAM = "top_k"
#: ``params={"explain": true}`` adds an ``explanation`` column (JSON; see :mod:`skinml.explain`).
EXPLAIN_PARAM = "explain"
EXPLANATION_COLUMN = "explanation"
DEFAULT_TOP_K = 3
#: ``params={"allow_extra_columns": true}`` ignores unknown request columns (with a warning)
#: instead of refusing the request.
ALLOW_EXTRA_PARAM = "allow_extra_columns"
#: Request values echoed in messages are cut to this many characters.
MAX_ECHO = 80
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


def cut(text: str, limit: int = MAX_ECHO) -> str:
    """``text`` cut to ``limit`` characters, "..." marking the cut."""
    return text if len(text) <= limit else text[:limit] + "..."


def shown(value: Any, limit: int = MAX_ECHO) -> str:
    """``repr(value)`` cut to ``limit`` characters, for echoing request values."""
    try:
        text = repr(value)
    except ValueError:  # an int too long for str() (Python refuses > 4,300 digits)
        text = f"<integer of {value.bit_length():,} bits>"
    return cut(text, limit)


def field_error(row: Any, field: Any, problem: str) -> RequestError:
    """A :class:`RequestError` whose message starts with ``row <row>, field '<field>': ``."""
    return RequestError(f"row {cut(str(row))}, field '{cut(str(field))}': {problem}", row, str(field))


@dataclass(frozen=True)
class ServingLimits:
    """Limits that protect the server; fixed at registration, overridable at load time."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_rows: int = DEFAULT_MAX_ROWS
    min_side: int = DEFAULT_MIN_SIDE  # px on the photo's short side; smaller ones are refused

    def to_dict(self) -> dict[str, int]:
        return {"max_pixels": self.max_pixels, "max_image_bytes": self.max_image_bytes, "max_rows": self.max_rows,
                "min_side": self.min_side}

    @classmethod
    def from_dict(cls, state: dict[str, Any] | None) -> ServingLimits:
        state = state or {}
        defaults = cls()
        keys = ("max_pixels", "max_image_bytes", "max_rows", "min_side")  # older models lack min_side
        return cls(**{k: int(state.get(k, getattr(defaults, k))) for k in keys})


@dataclass
class ValidRequest:
    """A request that passed validation, ready for the model."""

    index: pd.Index
    images: torch.Tensor | None  # (N, 3, S, S) float, the evaluation transform applied
    metadata: np.ndarray  # (N, F) float32, from the fitted preprocessor
    warnings: list[list[str]]  # per row: unknown categories (scored as unknown), imputed fields, ignored columns


# -- signature ----------------------------------------------------------------------------


def clinical_columns(preprocessor: MetadataPreprocessor) -> list[str]:
    """The clinical columns a request may carry: those the fitted preprocessor reads."""
    return list(preprocessor.input_columns)


def request_columns(preprocessor: MetadataPreprocessor) -> list[str]:
    """Every column a request may carry: ``image`` and the clinical columns."""
    return [IMAGE_COLUMN, *clinical_columns(preprocessor)]


def model_signature(preprocessor: MetadataPreprocessor, uses_images: bool = True, labels=schema.LABELS):
    """Explicit MLflow signature: the parameters and the response columns, and no input schema.

    Input columns are left out because MLflow drops any column a named input schema lacks before
    the model sees it (``mlflow.models.utils._enforce_schema``): the model could not refuse a
    misspelled field. ``preprocessor`` and ``uses_images`` are kept for callers; the accepted
    columns are :func:`request_columns`."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema

    outputs = [
        ColSpec(DataType.string, LABEL_COLUMN),
        ColSpec(DataType.string, LABEL_NAME_COLUMN),
        ColSpec(DataType.double, PROBABILITY_COLUMN),
        *[ColSpec(DataType.double, label) for label in labels],
        ColSpec(Array(DataType.string), TOP_LABELS_COLUMN),
        ColSpec(Array(DataType.double), TOP_PROBABILITIES_COLUMN),
        ColSpec(Array(DataType.string), WARNINGS_COLUMN, required=False),
    ]
    outputs.append(ColSpec(DataType.string, EXPLANATION_COLUMN, required=False))  # only with explain=true
    params = ParamSchema([ParamSpec(TOP_K_PARAM, DataType.long, DEFAULT_TOP_K),
                          ParamSpec(EXPLAIN_PARAM, DataType.boolean, False),
                          ParamSpec(ALLOW_EXTRA_PARAM, DataType.boolean, False)])
    return ModelSignature(inputs=None, outputs=Schema(outputs), params=params)


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
        raise field_error(row, IMAGE_COLUMN, "missing; send the photo as a base64-encoded PNG or JPEG string")
    elif not isinstance(value, str):
        raise field_error(row, IMAGE_COLUMN, f"must be a base64 string, got {type(value).__name__} {shown(value)}")
    else:
        text = "".join(_DATA_URI.sub("", value.strip()).split())  # `base64` wraps lines; data: URIs
        # Decoded size is 3/4 of the text: refuse oversized payloads before decoding them.
        if len(text) * 3 // 4 > limits.max_image_bytes:
            raise field_error(row, IMAGE_COLUMN, f"holds about {len(text) * 3 // 4:,} bytes, above the limit of "
                                                 f"{limits.max_image_bytes:,}")
        try:
            urlsafe = "-" in text or "_" in text  # the URL-safe alphabet is accepted too
            data = base64.b64decode(text, altchars=b"-_" if urlsafe else None, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise field_error(row, IMAGE_COLUMN, f"not valid base64 ({exc}); encode the PNG/JPEG file with "
                                                 "standard base64") from None
    if not data:
        raise field_error(row, IMAGE_COLUMN, "empty")
    if len(data) > limits.max_image_bytes:
        raise field_error(row, IMAGE_COLUMN, f"holds {len(data):,} bytes, above the limit of "
                                             f"{limits.max_image_bytes:,}")
    return data


def _as_frame(request: Any) -> pd.DataFrame:
    if isinstance(request, pd.DataFrame):
        return request
    if isinstance(request, dict):
        # MLflow's `inputs` format arrives as a dict of numpy arrays (0-d for a single value).
        request = {k: v.item() if isinstance(v, np.ndarray) and v.ndim == 0 else v for k, v in request.items()}
        try:  # {"image": [...], "age": [...]} or a single row {"image": "...", "age": 55}
            columnar = any(isinstance(v, (list, tuple, np.ndarray, pd.Series)) for v in request.values())
            return pd.DataFrame(request) if columnar else pd.DataFrame([request])
        except ValueError as exc:
            raise RequestError(f"request columns must all have the same length ({cut(str(exc), 200)})") from None
    if isinstance(request, (list, tuple)) and all(isinstance(r, dict) for r in request):
        return pd.DataFrame(list(request))
    raise RequestError(f"request must be a table of rows (DataFrame or records), got {type(request).__name__}")


def _first_row_with_value(frame: pd.DataFrame, column: Any) -> Any:
    """The row an unknown column is reported at: the first that gives it a value."""
    for row, value in frame[column].items():
        if not schema.is_missing(value):
            return row
    return frame.index[0]


def _closest(name: Any, valid: list[str]) -> str | None:
    text = str(name).strip()
    for candidate in valid:  # `Age`, `AGE `: the same name in another case is the obvious match
        if candidate.lower() == text.lower():
            return candidate
    match = difflib.get_close_matches(text.lower(), valid, n=1, cutoff=0.6)
    return match[0] if match else None


def check_columns(frame: pd.DataFrame, preprocessor: MetadataPreprocessor, allow_extra: bool = False) -> list[Any]:
    """Refuse duplicate columns and columns this model does not read; returns the unknown columns
    when ``allow_extra`` (the caller ignores them).

    MLflow's own schema enforcement would drop an unknown column silently, and a misspelled
    clinical field would then be imputed, i.e. scored like the all-benign rows with no
    questionnaire; so an unknown name is an error naming the closest valid name.
    """
    valid = request_columns(preprocessor)
    duplicated = [c for c in dict.fromkeys(frame.columns[frame.columns.duplicated()])]
    if duplicated:
        raise field_error(frame.index[0], duplicated[0],
                          f"given {list(frame.columns).count(duplicated[0])} times; send each field once")
    unknown = [c for c in frame.columns if c not in valid]
    if not unknown or allow_extra:
        return unknown

    def describe(column: Any) -> str:
        match = _closest(column, valid)
        return f"did you mean {match!r}?" if match else "no field of this model is close"

    first, others = unknown[0], unknown[1:]
    problem = f"not a field of this model ({describe(first)})"
    if others:
        problem += "; also unknown: " + ", ".join(f"'{cut(str(c))}' ({describe(c)})" for c in others[:10])
        if len(others) > 10:
            problem += f" and {len(others) - 10} more"
    problem += (f". Valid fields: {', '.join(valid)}. To ignore unknown fields instead, send "
                f'params {{"{ALLOW_EXTRA_PARAM}": true}}')
    raise field_error(_first_row_with_value(frame, first), first, problem)


_SCALAR_TYPES = (str, bool, int, float, np.integer, np.floating, np.bool_)


def check_clinical_values(clinical: pd.DataFrame | ColumnTable, preprocessor: MetadataPreprocessor) -> None:
    """Refuse values the preprocessor cannot use, with messages that start with the row and
    field and echo at most :data:`MAX_ECHO` characters of the value."""
    numeric = set(preprocessor.numeric_columns)
    for column in clinical.columns:
        for row, value in zip(clinical.index, clinical[column]):
            if schema.is_missing(value):
                continue
            if not isinstance(value, _SCALAR_TYPES):
                raise field_error(row, column, f"must be a single text, number or true/false value, got "
                                               f"{type(value).__name__} {shown(value)}")
            if column in numeric:
                _check_number(row, column, value)
            elif isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) \
                    and abs(int(value)) >= 2**63:  # no category is such a number (and str() may refuse it)
                raise field_error(row, column, f"{shown(value)} is not a valid value")


def _check_number(row: Any, column: str, value: Any) -> None:
    low, high = schema.NUMERIC_RANGES[column]
    if isinstance(value, (bool, np.bool_)):
        raise field_error(row, column, f"must be a number, got {shown(value)}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float range
        number = math.inf
    except (TypeError, ValueError):
        raise field_error(row, column, f"must be a number, got {shown(value)}") from None
    if not math.isfinite(number) or not low <= number <= high:
        raise field_error(row, column, f"{shown(value)} is out of range [{low:g}, {high:g}]")


def normalise_clinical(frame: pd.DataFrame, preprocessor: MetadataPreprocessor) -> pd.DataFrame:
    """Clinical columns only, with ``UNK`` turned into "missing" where it is not a category.

    ``UNK`` is a category of its own where the data has it (``itch``, countries...); elsewhere
    (age, smoke, region...) a client sending ``UNK`` means "not known", which is imputed like a
    missing value rather than scored as an unseen category. A DataFrame of Python objects; see
    :func:`clinical_table` for the same values column by column.
    """
    return clinical_table(frame, preprocessor).to_frame()


def clinical_table(frame: pd.DataFrame, preprocessor: MetadataPreprocessor) -> ColumnTable:
    """:func:`normalise_clinical` as a :class:`ColumnTable`: the request path's form, read
    column by column by the checks, the encoding and the warnings without pandas per column."""
    columns = [c for c in clinical_columns(preprocessor) if c in frame.columns]
    clinical = ColumnTable.from_frame(frame, columns)  # a copy
    for column in columns:
        if schema.UNKNOWN_TOKEN in preprocessor.vocabularies_.get(column, ()) \
                or schema.UNKNOWN_TOKEN in schema.VOCABULARIES.get(column, ()):
            continue
        values = clinical[column]
        for i, value in enumerate(values):
            if isinstance(value, str) and value.strip().upper() == schema.UNKNOWN_TOKEN:
                values[i] = None
    return clinical


def unknown_value_warnings(clinical: pd.DataFrame | ColumnTable, preprocessor: MetadataPreprocessor) -> dict[Any, list[str]]:
    """Per row, one warning for each category the model never saw (it is scored as "unknown")."""
    found: dict[Any, list[str]] = {}
    for row, column, value in preprocessor.unseen_values(clinical):
        documented = schema.VOCABULARIES.get(column, ())
        if value in documented:
            why = "was not seen in training"
        else:
            why = f"is not a known value (expected one of {', '.join(documented)})" if documented else "is unknown"
        found.setdefault(row, []).append(f"row {row}: {column}={shown(value)} {why}; scored as unknown")
    return found


def imputed_fields(clinical: pd.DataFrame | ColumnTable, preprocessor: MetadataPreprocessor) -> dict[Any, list[str]]:
    """Per row, the clinical fields the model reads that the row leaves missing (absent, null,
    empty, or ``UNK`` where that is not a category): the preprocessor imputes them."""
    numeric = set(preprocessor.numeric_columns)
    present = set(clinical.columns)
    found: dict[Any, list[str]] = {row: [] for row in clinical.index}
    for column in clinical_columns(preprocessor):
        if column not in present:
            for fields in found.values():
                fields.append(column)
            continue
        for row, value in zip(clinical.index, clinical[column]):
            if column in numeric:
                missing = schema.is_missing(value)
            else:
                missing = schema.canonical_category(column, value) is None
            if missing:
                found[row].append(column)
    return found


def validate_request(
    request: Any,
    preprocessor: MetadataPreprocessor,
    image_config: ImageConfig | None,
    limits: ServingLimits | None = None,
    allow_extra: bool = False,
    uses_metadata: bool = True,
) -> ValidRequest:
    """Check and encode a request; raises :class:`RequestError` naming the row and field.

    Images go through :func:`skinml.data.transforms.prepare_image`, the evaluation transform,
    so served probabilities equal evaluation's. ``image_config=None`` (metadata-only models)
    ignores the ``image`` column. Unknown columns are refused unless ``allow_extra``; with
    ``uses_metadata`` (the model reads the clinical fields) imputed fields are listed in the
    row's warnings.
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
    ignored = check_columns(frame, preprocessor, allow_extra)

    images = None
    if image_config is not None:
        if IMAGE_COLUMN not in frame.columns:
            raise field_error(frame.index[0], IMAGE_COLUMN, "missing: the request has no 'image' field; every row "
                                                            "needs the photo as a base64 PNG or JPEG string")
        config = replace(image_config, max_pixels=limits.max_pixels)
        tensors = []
        for row, value in frame[IMAGE_COLUMN].items():
            data = _decode_image_field(value, row, limits)
            try:
                check_image(data, name=f"row {row}", max_pixels=limits.max_pixels, min_side=limits.min_side)
                tensors.append(prepare_image(data, config, name=f"row {row}"))
            except ImageError as exc:
                raise field_error(row, IMAGE_COLUMN, cut(str(exc), 300)) from None
        images = torch.stack(tensors)

    clinical = clinical_table(frame, preprocessor)
    check_clinical_values(clinical, preprocessor)
    try:
        metadata = preprocessor.transform(clinical)
    except MetadataError as exc:  # check_clinical_values should have caught it; keep the promise anyway
        raise field_error(exc.row, exc.column, cut(str(exc), 300)) from None
    warnings = unknown_value_warnings(clinical, preprocessor)
    if uses_metadata:
        for row, fields in imputed_fields(clinical, preprocessor).items():
            if fields:
                warnings.setdefault(row, []).append(
                    f"row {row}: {len(fields)} clinical field(s) missing, imputed from the training data: "
                    f"{', '.join(fields)}")
    for column in ignored:
        for row, value in frame[column].items():
            if not schema.is_missing(value):
                warnings.setdefault(row, []).append(
                    f"row {row}: field '{cut(str(column))}' is not a field of this model; ignored")
    return ValidRequest(frame.index, images, metadata, [warnings.get(row, []) for row in frame.index])


def validate_flag(value: Any, name: str) -> bool:
    """A true/false parameter: JSON booleans, or the strings "true"/"false"; absent is false."""
    if value is None or isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise RequestError(f"parameter '{name}' must be true or false, got {shown(value)}", field=name)


def validate_top_k(value: Any, num_labels: int = schema.NUM_CLASSES) -> int:
    """The ``top_k`` parameter: a whole number from 1 to the number of labels (default 3)."""
    if value is None:
        return min(DEFAULT_TOP_K, num_labels)
    top_k = None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        top_k = int(value)
    elif isinstance(value, (float, np.floating)) and float(value).is_integer():
        top_k = int(value)
    elif isinstance(value, str) and value.strip().lstrip("+-").isdigit() and len(value) < 20:
        top_k = int(value)
    if top_k is None:
        raise RequestError(f"parameter '{TOP_K_PARAM}' must be a whole number, got {shown(value)}", field=TOP_K_PARAM)
    if not 1 <= top_k <= num_labels:
        raise RequestError(f"parameter '{TOP_K_PARAM}' must be between 1 and {num_labels}, got {shown(top_k)}",
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
    columns: dict[str, Any] = {
        LABEL_COLUMN: [labels[i] for i in best],
        LABEL_NAME_COLUMN: [schema.LABEL_NAMES.get(labels[i], labels[i]) for i in best],
        PROBABILITY_COLUMN: probabilities[np.arange(len(best)), best],
    }
    columns.update({label: probabilities[:, j] for j, label in enumerate(labels)})
    columns[TOP_LABELS_COLUMN] = [[labels[i] for i in row[:top_k]] for row in order]
    columns[TOP_PROBABILITIES_COLUMN] = [[float(p[i]) for i in row[:top_k]] for p, row in zip(probabilities, order)]
    columns[WARNINGS_COLUMN] = warnings if warnings is not None else [[] for _ in range(len(best))]
    return pd.DataFrame(columns, index=index)  # built at once: a column at a time costs ~1 ms each
