"""The PAD-UFES-20 schema: column names, label order and vocabularies, defined once.

Everything that reads or writes clinical rows (loader, preprocessor, synthetic generator,
served model signature, tests) imports from here, so both ends of the pipeline agree.
"""

from __future__ import annotations

import math

#: The 26 columns of the official ``metadata.csv``, in file order.
COLUMNS: tuple[str, ...] = (
    "patient_id",
    "lesion_id",
    "smoke",
    "drink",
    "background_father",
    "background_mother",
    "age",
    "pesticide",
    "gender",
    "skin_cancer_history",
    "cancer_history",
    "has_piped_water",
    "has_sewage_system",
    "fitspatrick",
    "region",
    "diameter_1",
    "diameter_2",
    "diagnostic",
    "itch",
    "grew",
    "hurt",
    "changed",
    "bleed",
    "elevation",
    "img_id",
    "biopsed",
)

PATIENT_ID = "patient_id"
LESION_ID = "lesion_id"
IMAGE_ID = "img_id"
TARGET = "diagnostic"
ID_COLUMNS: tuple[str, ...] = (PATIENT_ID, LESION_ID, IMAGE_ID)

#: Label order used by every model output, metric and served prediction.
LABELS: tuple[str, ...] = ("ACK", "BCC", "MEL", "NEV", "SCC", "SEK")
NUM_CLASSES = len(LABELS)
LABEL_TO_INDEX: dict[str, int] = {label: i for i, label in enumerate(LABELS)}
LABEL_NAMES: dict[str, str] = {
    "ACK": "Actinic keratosis",
    "BCC": "Basal cell carcinoma",
    "MEL": "Melanoma",
    "NEV": "Melanocytic nevus",
    "SCC": "Squamous cell carcinoma (incl. Bowen's disease)",
    "SEK": "Seborrheic keratosis",
}
MALIGNANT_LABELS: frozenset[str] = frozenset({"BCC", "MEL", "SCC"})
#: Spellings some copies of the data use for a class of ours.
DIAGNOSIS_ALIASES: dict[str, str] = {"BOD": "SCC"}

NUMERIC_FEATURES: tuple[str, ...] = ("age", "diameter_1", "diameter_2")
#: ``biopsed`` is a label proxy (every BCC/MEL/SCC is biopsy-proven): excluded unless asked.
LABEL_PROXY_FEATURES: tuple[str, ...] = ("biopsed",)
CATEGORICAL_FEATURES: tuple[str, ...] = (
    "smoke",
    "drink",
    "background_father",
    "background_mother",
    "pesticide",
    "gender",
    "skin_cancer_history",
    "cancer_history",
    "has_piped_water",
    "has_sewage_system",
    "fitspatrick",
    "region",
    "itch",
    "grew",
    "hurt",
    "changed",
    "bleed",
    "elevation",
    "biopsed",
)
#: Every candidate feature (22), in file order.
FEATURES: tuple[str, ...] = tuple(c for c in COLUMNS if c in NUMERIC_FEATURES or c in CATEGORICAL_FEATURES)

#: The 13 questionnaire fields that are missing together in 804 official rows (all benign).
QUESTIONNAIRE_FEATURES: tuple[str, ...] = (
    "smoke",
    "drink",
    "background_father",
    "background_mother",
    "pesticide",
    "gender",
    "skin_cancer_history",
    "cancer_history",
    "has_piped_water",
    "has_sewage_system",
    "fitspatrick",
    "diameter_1",
    "diameter_2",
)

UNKNOWN_TOKEN = "UNK"
_BOOL = ("False", "True")
_BOOL_UNK = ("False", "True", UNKNOWN_TOKEN)
_COUNTRIES = (
    "AUSTRIA",
    "BRAZIL",
    "CZECH",
    "GERMANY",
    "ISRAEL",
    "ITALY",
    "NETHERLANDS",
    "NORWAY",
    "POLAND",
    "POMERANIA",
    "PORTUGAL",
    "SPAIN",
    UNKNOWN_TOKEN,
)
REGIONS: tuple[str, ...] = (
    "ABDOMEN",
    "ARM",
    "BACK",
    "CHEST",
    "EAR",
    "FACE",
    "FOOT",
    "FOREARM",
    "HAND",
    "LIP",
    "NECK",
    "NOSE",
    "SCALP",
    "THIGH",
)

#: Values documented for each categorical column (after canonicalisation). The preprocessor
#: learns its own vocabulary from training data; this list describes the dataset and drives
#: the synthetic generator and the "unknown value" warnings of the served model.
VOCABULARIES: dict[str, tuple[str, ...]] = {
    "smoke": _BOOL,
    "drink": _BOOL,
    "background_father": _COUNTRIES,
    "background_mother": _COUNTRIES,
    "pesticide": _BOOL,
    "gender": ("FEMALE", "MALE"),
    "skin_cancer_history": _BOOL,
    "cancer_history": _BOOL,
    "has_piped_water": _BOOL,
    "has_sewage_system": _BOOL,
    "fitspatrick": ("1.0", "2.0", "3.0", "4.0", "5.0", "6.0"),
    "region": REGIONS,
    "itch": _BOOL_UNK,
    "grew": _BOOL_UNK,
    "hurt": _BOOL_UNK,
    "changed": _BOOL_UNK,
    "bleed": _BOOL_UNK,
    "elevation": _BOOL_UNK,
    "biopsed": _BOOL,
}

#: Plausible ranges of the numeric fields; values outside are rejected as input errors.
NUMERIC_RANGES: dict[str, tuple[float, float]] = {
    "age": (0.0, 120.0),
    "diameter_1": (0.0, 200.0),
    "diameter_2": (0.0, 200.0),
}

_VALUE_ALIASES: dict[str, dict[str, str]] = {
    "background_father": {"BRASIL": "BRAZIL"},
    "background_mother": {"BRASIL": "BRAZIL"},
}


def is_missing(value: object) -> bool:
    """True for None, NaN and empty or whitespace-only strings."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, str) and not value.strip():
        return True
    try:  # pandas.NA / NaT without importing pandas here
        return bool(value != value)  # noqa: PLR0124
    except (TypeError, ValueError):
        return False


def canonical_category(column: str, value: object) -> str | None:
    """Return the canonical spelling of a categorical value, or None when it is missing.

    Booleans arrive as Python bools, ``"True"``/``"true"``/``"TRUE"``; Fitzpatrick types as
    ``3``, ``"3"`` or ``"3.0"``; countries in either Portuguese or English spelling of Brazil.
    """
    if is_missing(value):
        return None
    if isinstance(value, bool):
        return "True" if value else "False"
    text = str(value).strip()
    if column == "fitspatrick":
        try:
            return f"{float(text):.1f}"
        except ValueError:
            return text.upper()
    upper = text.upper()
    if upper in ("TRUE", "FALSE"):
        return upper.capitalize()
    return _VALUE_ALIASES.get(column, {}).get(upper, upper)


def canonical_label(value: object) -> str | None:
    """Map a diagnosis to our label set (``BOD`` -> ``SCC``); None if it is not one of ours."""
    if is_missing(value):
        return None
    text = str(value).strip().upper()
    text = DIAGNOSIS_ALIASES.get(text, text)
    return text if text in LABEL_TO_INDEX else None
