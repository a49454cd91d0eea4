"""The page's questionnaire, generated from :mod:`skinml.data.schema`.

Every clinical field the model reads becomes one optional question with the dataset's own
vocabulary (values as in ``metadata.csv``), units and ranges. ``biopsed`` is never asked: it is
a label proxy and is unknown when a lesion is triaged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from skinml.data import schema

#: Questions in plain language; the field names stay those of metadata.csv.
QUESTIONS: dict[str, str] = {
    "age": "Age",
    "gender": "Sex",
    "fitspatrick": "Fitzpatrick skin type",
    "region": "Body region of the lesion",
    "diameter_1": "Lesion diameter, longest",
    "diameter_2": "Lesion diameter, perpendicular",
    "itch": "Does it itch?",
    "grew": "Has it grown?",
    "hurt": "Does it hurt?",
    "changed": "Has it changed?",
    "bleed": "Has it bled?",
    "elevation": "Is it raised?",
    "smoke": "Smokes?",
    "drink": "Drinks alcohol?",
    "pesticide": "Exposed to pesticides?",
    "skin_cancer_history": "Previous skin cancer?",
    "cancer_history": "Previous cancer of any kind?",
    "has_piped_water": "Piped water at home?",
    "has_sewage_system": "Sewage system at home?",
    "background_father": "Father's country of origin",
    "background_mother": "Mother's country of origin",
}
UNITS: dict[str, str] = {"age": "years", "diameter_1": "mm", "diameter_2": "mm"}
GROUPS: dict[str, tuple[str, ...]] = {
    "Patient": ("age", "gender", "fitspatrick"),
    "Lesion": ("region", "diameter_1", "diameter_2", "itch", "grew", "hurt", "changed", "bleed", "elevation"),
    "History and lifestyle": ("skin_cancer_history", "cancer_history", "smoke", "drink", "pesticide",
                              "has_piped_water", "has_sewage_system", "background_father", "background_mother"),
}
NEVER_ASKED: frozenset[str] = frozenset(schema.LABEL_PROXY_FEATURES)

_CHOICE_LABELS = {"True": "Yes", "False": "No", schema.UNKNOWN_TOKEN: "Unknown", "FEMALE": "Female", "MALE": "Male"}


def _choice_label(column: str, value: str) -> str:
    if column == "fitspatrick":
        roman = ("I", "II", "III", "IV", "V", "VI")
        return f"Type {roman[int(float(value)) - 1]}"
    return _CHOICE_LABELS.get(value, value.replace("_", " ").capitalize())


def questionnaire(fields: Iterable[str] | None = None) -> dict[str, Any]:
    """The form description ``/api/schema`` serves: groups of optional fields with their choices.

    ``fields`` are the clinical columns the model accepts (default: every feature); ``biopsed``
    is dropped whatever the model accepts.
    """
    accepted = [c for c in (fields if fields is not None else schema.FEATURES)
                if c in schema.FEATURES and c not in NEVER_ASKED]
    out_fields = []
    for group, columns in GROUPS.items():
        for column in columns:
            if column not in accepted:
                continue
            spec: dict[str, Any] = {"name": column, "label": QUESTIONS.get(column, column), "group": group,
                                    "required": False}
            if column in schema.NUMERIC_FEATURES:
                low, high = schema.NUMERIC_RANGES[column]
                spec.update(type="number", unit=UNITS.get(column), minimum=low, maximum=high,
                            step=1 if column == "age" else 0.5)
            else:
                values = schema.VOCABULARIES[column]
                spec.update(type="choice",
                            choices=[{"value": v, "label": _choice_label(column, v)} for v in values])
            out_fields.append(spec)
    leftover = [c for c in accepted if c not in {f["name"] for f in out_fields}]
    for column in leftover:  # a model reading a field this page does not group still gets a question
        out_fields.append({"name": column, "label": column, "group": "Other", "required": False, "type": "text"})
    return {
        "fields": out_fields,
        "groups": [g for g in [*GROUPS, "Other"] if any(f["group"] == g for f in out_fields)],
        "labels": [{"label": label, "name": schema.LABEL_NAMES[label], "malignant": label in schema.MALIGNANT_LABELS}
                   for label in schema.LABELS],
        "note": "Every field is optional; unanswered fields are imputed as in training (the training "
                "mean or most frequent value), and the result lists them.",
    }


def clean_answers(raw: Mapping[str, Any], fields: Iterable[str]) -> dict[str, Any]:
    """The answered fields among ``fields``: blanks dropped, text trimmed; values are not
    judged here, the model validates them and names the field in its 400."""
    wanted = set(fields)
    answers = {}
    for name, value in raw.items():
        if name not in wanted or schema.is_missing(value):
            continue
        answers[name] = value.strip() if isinstance(value, str) else value
    return answers


def imputed_fields(answers: Mapping[str, Any], fields: Iterable[str]) -> list[str]:
    """Fields the model will impute: not answered, or ``UNK`` where ``UNK`` is not a category."""
    out = []
    for column in fields:
        if column in NEVER_ASKED:
            continue
        value = answers.get(column)
        if schema.is_missing(value):
            out.append(column)
        elif (isinstance(value, str) and value.strip().upper() == schema.UNKNOWN_TOKEN
              and schema.UNKNOWN_TOKEN not in schema.VOCABULARIES.get(column, ())):
            out.append(column)
    return out
