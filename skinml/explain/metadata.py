"""Which clinical answers moved a prediction: Shapley values per clinical field, image held fixed.

Attributions are computed on the encoded feature vector but reported per clinical *field*: the
encoded columns of one field (its ordinal code, its one-hot columns, its missing indicator) form
one group and move together, so "region" gets one number however it is encoded.

**Baseline.** An attribution says how far the prediction moved away from a reference patient.
Zeros are not a patient (code 0 means "a category never seen in training", and z = 0 is the
training mean), and "everything missing" is not neutral in PAD-UFES-20: the 804 rows without a
questionnaire are all benign, so a model can read "not answered" as "benign". The reference
used here is the *typical answered patient*: every field at its most common answer in the
training split (the training mean for age and diameters), with every missing indicator off.
That is also what the preprocessor substitutes for a missing field, so without missing
indicators a field left blank contributes exactly 0 (the model cannot tell it from the typical
answer); with indicators, "not answered" gets a contribution of its own.

**Method.** Shapley value sampling (Captum) over the fields: averaged over random orders, each
field's marginal change of the explained class's probability; the contributions of one row add
up exactly to p(input) - p(baseline). The permutations come from a fixed seed, so the same input
always gets the same numbers (the served model and ``skinml explain`` agree).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from skinml.data import schema
from skinml.data.preprocess import MetadataPreprocessor

#: Random field orders per explanation: enough that the top fields' order is stable (the
#: standard error of a contribution shrinks as 1/sqrt(n)), cheap because the image is cached.
DEFAULT_PERMUTATIONS = 25
DEFAULT_SEED = 0
_MISSING_SUFFIX = "_missing"


@dataclass(frozen=True)
class FieldContribution:
    """One clinical field's signed contribution to the probability of ``towards``."""

    field: str
    value: str | None  # the answer in clinical words; None when the field was not answered
    contribution: float
    towards: str

    def text(self) -> str:
        """``bleed: True  +0.21 towards BCC`` (a negative number reads "against")."""
        direction = "towards" if self.contribution >= 0 else "against"
        shown = self.value if self.value is not None else "(not answered)"
        return f"{self.field}: {shown}  {self.contribution:+.2f} {direction} {self.towards}"

    def to_dict(self) -> dict[str, Any]:
        return {"field": self.field, "value": self.value, "contribution": self.contribution, "towards": self.towards}


@dataclass(frozen=True)
class MetadataBaseline:
    """The reference patient the contributions are measured from."""

    vector: np.ndarray  # (F,) float32, in the preprocessor's feature order
    values: dict[str, str]  # field -> the reference answer in clinical words

    @property
    def description(self) -> str:
        answers = ", ".join(f"{field}={value}" for field, value in self.values.items())
        return ("typical answered patient: every clinical field at its most common answer in the training split "
                "(training mean for numbers), missing indicators off; a field left blank is imputed to this same "
                f"answer by the preprocessor. Reference answers: {answers}")


def field_groups(preprocessor: MetadataPreprocessor) -> dict[str, list[int]]:
    """Clinical field -> the indices of its encoded columns (value columns and missing indicator)."""
    names = preprocessor.get_feature_names_out()
    fields = list(preprocessor.input_columns)
    groups: dict[str, list[int]] = {field: [] for field in fields}
    for index, name in enumerate(names):
        owners = [f for f in fields if name == f or name.startswith(f + "=") or name == f + _MISSING_SUFFIX]
        if len(owners) != 1:
            raise ValueError(f"encoded metadata column {name!r} belongs to {len(owners)} clinical fields "
                             f"({owners}); cannot sum its attribution back to one field")
        groups[owners[0]].append(index)
    return {field: indices for field, indices in groups.items() if indices}


def metadata_baseline(preprocessor: MetadataPreprocessor) -> MetadataBaseline:
    """The typical answered patient (see the module docstring), encoded by ``preprocessor``."""
    blank = pd.DataFrame([{field: None for field in preprocessor.input_columns}])
    vector = preprocessor.transform(blank)[0].copy()
    names = preprocessor.get_feature_names_out()
    for index, name in enumerate(names):
        if name.endswith(_MISSING_SUFFIX) and name[: -len(_MISSING_SUFFIX)] in preprocessor.indicator_columns_:
            vector[index] = 0.0  # "answered": missingness is scored as a value of its own
    values = {}
    for field in preprocessor.input_columns:
        if field in preprocessor.numeric_columns:
            values[field] = f"{preprocessor.means_[field]:.4g}"
        else:
            values[field] = preprocessor.modes_[field]
    return MetadataBaseline(vector.astype(np.float32), values)


def clinical_values(clinical: pd.DataFrame, preprocessor: MetadataPreprocessor) -> list[dict[str, str | None]]:
    """Per row, each field's answer in clinical words (canonical spelling), None where missing."""
    rows = []
    for _, record in clinical.iterrows():
        row: dict[str, str | None] = {}
        for field in preprocessor.input_columns:
            raw = record.get(field)
            if schema.is_missing(raw):
                row[field] = None
            elif field in preprocessor.numeric_columns:
                row[field] = f"{float(raw):g}"
            else:
                row[field] = schema.canonical_category(field, raw)
        rows.append(row)
    return rows


@contextmanager
def image_features_fixed(model: nn.Module, image: torch.Tensor | None):
    """Within the block, every image backbone returns its features for ``image`` (batch 1),
    repeated to whatever batch it is called with.

    The metadata attributions evaluate the model hundreds of times with the same photo; replaying
    the backbones' outputs holds the image fixed exactly and makes those calls cost only the
    metadata branch and head. Both ``forward`` and ``forward_features`` are replayed because the
    fusion models call one or the other.
    """
    backbones = list(model.image_backbones()) if image is not None and hasattr(model, "image_backbones") else []
    patched: list[tuple[nn.Module, str]] = []
    try:
        for backbone in backbones:
            for method in ("forward", "forward_features"):
                original = getattr(backbone, method, None)
                if original is None:
                    continue
                cache: dict[str, torch.Tensor] = {}

                def replay(x, *args, _original=original, _cache=cache, **kwargs):
                    if "out" not in _cache:
                        with torch.no_grad():
                            _cache["out"] = _original(image, *args, **kwargs)
                    out = _cache["out"]
                    return out.expand(x.shape[0], *out.shape[1:])

                # An instance attribute shadows the class's method; deleting it restores the method.
                object.__setattr__(backbone, method, replay)
                patched.append((backbone, method))
        yield
    finally:
        for backbone, method in patched:
            object.__delattr__(backbone, method)


def metadata_contributions(
    model: nn.Module,
    image: torch.Tensor | None,
    metadata: torch.Tensor,
    target: int,
    preprocessor: MetadataPreprocessor,
    values: dict[str, str | None],
    labels: list[str] | tuple[str, ...] = schema.LABELS,
    n_permutations: int = DEFAULT_PERMUTATIONS,
    seed: int = DEFAULT_SEED,
) -> tuple[list[FieldContribution], float, float]:
    """Shapley contributions of each clinical field to p(``target``) for one row, largest first.

    ``image`` (1, 3, S, S) is held fixed (None for metadata-only models); ``metadata`` is the
    (1, F) encoded row and ``values`` its answers in clinical words. Returns the contributions,
    p(target) at the baseline and p(target) for the input.
    """
    from captum.attr import ShapleyValueSampling

    if metadata.ndim != 2 or metadata.shape[0] != 1:
        raise ValueError(f"metadata must be one encoded row of shape (1, F), got {tuple(metadata.shape)}")
    groups = field_groups(preprocessor)
    if metadata.shape[1] != preprocessor.n_features_out:
        raise ValueError(f"metadata has {metadata.shape[1]} columns, the preprocessor makes {preprocessor.n_features_out}")
    feature_mask = torch.zeros_like(metadata, dtype=torch.long)
    for group, indices in enumerate(groups.values()):
        feature_mask[0, indices] = group
    baseline = torch.from_numpy(metadata_baseline(preprocessor).vector)[None]

    def probability(encoded: torch.Tensor) -> torch.Tensor:
        batch_image = None if image is None else image.expand(encoded.shape[0], *image.shape[1:])
        return torch.softmax(model(batch_image, encoded).float(), dim=1)

    model.eval()
    with image_features_fixed(model, image), torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # Captum draws the field orders from torch's global generator
        attribution = ShapleyValueSampling(probability).attribute(
            metadata, baselines=baseline, target=target, feature_mask=feature_mask,
            n_samples=n_permutations, perturbations_per_eval=len(groups),
        )
        p_baseline = float(probability(baseline)[0, target])
        p_input = float(probability(metadata)[0, target])
    contributions = [
        FieldContribution(field, values.get(field), float(attribution[0, indices[0]]), labels[target])
        for field, indices in groups.items()
    ]
    contributions.sort(key=lambda c: (-abs(c.contribution), c.field))
    return contributions, p_baseline, p_input
