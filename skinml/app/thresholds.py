"""The demo page's two decision thresholds, chosen on validation predictions and stored as JSON.

**Uncertainty note.** A prediction is flagged "unsure" when its top probability is low *or* the
entropy of its six probabilities is high. Both thresholds are chosen on the validation split by
one rule (selective accuracy): the loosest threshold at which the validation predictions it
calls *confident* are right at least ``target_accuracy`` of the time (default 80%), counting
only thresholds that keep at least ``min_confident`` rows confident. Everything below the
top-probability threshold, or above the entropy threshold, gets the note.

**Referral advice.** "See a dermatologist soon" is shown when P(BCC) + P(SCC) + P(MEL), the
malignant score, reaches a threshold. The threshold is the highest one that still flags at
least ``target_sensitivity`` (default 95%) of the malignant validation lesions. Its sensitivity
and specificity on the *test* split are then reported with patient-bootstrap intervals
(:func:`skinml.evaluation.bootstrap.bootstrap_ci`); the test split chooses nothing.

Input: ``predictions.csv`` as written by ``skinml evaluate`` (columns ``true``, ``p_ACK`` ...
``p_SEK``, and ``patient_id`` for the intervals).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from skinml.data import schema
from skinml.evaluation.bootstrap import bootstrap_ci
from skinml.evaluation.metrics import as_indices

MALIGNANT = tuple(label for label in schema.LABELS if label in schema.MALIGNANT_LABELS)
DEFAULT_TARGET_SENSITIVITY = 0.95
DEFAULT_TARGET_ACCURACY = 0.80
DEFAULT_MIN_CONFIDENT = 10
#: Used only when no validation predictions are available; the page then says "not calibrated".
UNCALIBRATED_TOP_PROBABILITY = 0.5
CONFIG_VERSION = 1


class CalibrationError(ValueError):
    """Predictions that cannot calibrate a threshold; the message names the file and column."""


# -- reading predictions ------------------------------------------------------------------


def read_predictions(source: str | os.PathLike | pd.DataFrame, name: str | None = None) -> pd.DataFrame:
    """Load and check an evaluation ``predictions.csv`` (or an equivalent frame)."""
    if isinstance(source, pd.DataFrame):
        frame, name = source, name or "predictions"
    else:
        name = name or str(source)
        if not Path(source).is_file():
            raise CalibrationError(f"{name}: no such predictions file")
        frame = pd.read_csv(source)
    missing = [c for c in ["true", *(f"p_{label}" for label in schema.LABELS)] if c not in frame.columns]
    if missing:
        raise CalibrationError(f"{name}: missing column(s) {missing}; expected the predictions.csv that "
                               "`skinml evaluate` writes (true, p_ACK ... p_SEK)")
    if len(frame) == 0:
        raise CalibrationError(f"{name}: no rows")
    probabilities = frame[[f"p_{label}" for label in schema.LABELS]].to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(probabilities)) or (probabilities < 0).any():
        raise CalibrationError(f"{name}: p_* columns must hold finite, non-negative probabilities")
    unknown = sorted(set(map(str, frame["true"])) - set(schema.LABELS))
    if unknown:
        raise CalibrationError(f"{name}: column 'true' holds unknown labels {unknown}")
    frame = frame.copy()
    frame.attrs["name"] = name
    return frame


def probability_matrix(frame: pd.DataFrame) -> np.ndarray:
    return frame[[f"p_{label}" for label in schema.LABELS]].to_numpy(dtype=np.float64)


def normalised_entropy(probabilities: np.ndarray) -> np.ndarray:
    """Entropy of each row divided by log(number of classes): 0 = certain, 1 = uniform."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0)
    p = p / p.sum(axis=-1, keepdims=True)
    return -(p * np.log(p)).sum(axis=-1) / math.log(p.shape[-1])


def malignant_score(probabilities: np.ndarray | dict[str, float], labels=schema.LABELS) -> np.ndarray | float:
    """P(BCC) + P(MEL) + P(SCC), for a matrix (rows in ``labels`` order) or one {label: p} dict."""
    if isinstance(probabilities, dict):
        return float(sum(float(probabilities[label]) for label in MALIGNANT))
    columns = [list(labels).index(label) for label in MALIGNANT]
    return np.asarray(probabilities, dtype=np.float64)[:, columns].sum(axis=1)


# -- uncertainty --------------------------------------------------------------------------


def _loosest_threshold(scores: np.ndarray, correct: np.ndarray, higher_is_confident: bool, target: float,
                       min_confident: int) -> float | None:
    """The threshold calling the most rows confident whose confident rows reach ``target`` accuracy."""
    order = np.argsort(-scores if higher_is_confident else scores, kind="stable")
    ranked_scores, ranked_correct = scores[order], correct[order]
    accuracy = np.cumsum(ranked_correct) / np.arange(1, len(order) + 1)
    # A threshold must not split tied scores: only the last row of a run of ties is a valid cut.
    last_of_tie = np.append(ranked_scores[1:] != ranked_scores[:-1], True)
    valid = last_of_tie & (accuracy >= target) & (np.arange(1, len(order) + 1) >= min_confident)
    if not valid.any():
        return None
    return float(ranked_scores[np.flatnonzero(valid)[-1]])


def choose_uncertainty_thresholds(probabilities: np.ndarray, y_true: Any,
                                  target_accuracy: float = DEFAULT_TARGET_ACCURACY,
                                  min_confident: int = DEFAULT_MIN_CONFIDENT) -> dict[str, Any]:
    """Top-probability and entropy thresholds from validation predictions (see module doc).

    Returns ``{"top_probability", "entropy", "target_accuracy", "min_confident", "validation": {...}}``;
    a threshold is ``None`` when no cut reaches the target, and then every prediction is flagged.
    """
    if not 0 < target_accuracy <= 1:
        raise CalibrationError(f"target_accuracy must lie in (0, 1], got {target_accuracy}")
    probabilities = np.asarray(probabilities, dtype=np.float64)
    y = as_indices(y_true)
    correct = probabilities.argmax(axis=1) == y
    top = probabilities.max(axis=1)
    entropy = normalised_entropy(probabilities)
    top_threshold = _loosest_threshold(top, correct, True, target_accuracy, min_confident)
    entropy_threshold = _loosest_threshold(entropy, correct, False, target_accuracy, min_confident)
    unsure = is_uncertain(top, entropy, top_threshold, entropy_threshold)
    confident = ~unsure
    return {
        "top_probability": top_threshold,
        "entropy": entropy_threshold,
        "target_accuracy": float(target_accuracy),
        "min_confident": int(min_confident),
        "validation": {
            "n": int(len(y)),
            "accuracy": float(correct.mean()),
            "flagged_fraction": float(unsure.mean()),
            "accuracy_confident": float(correct[confident].mean()) if confident.any() else None,
            "accuracy_flagged": float(correct[unsure].mean()) if unsure.any() else None,
        },
    }


def is_uncertain(top_probability, entropy, top_threshold: float | None, entropy_threshold: float | None):
    """True where the top probability is below its threshold or the entropy above its own.

    A missing threshold (no cut reached the target accuracy on validation) flags everything.
    """
    top_probability = np.asarray(top_probability, dtype=np.float64)
    entropy = np.asarray(entropy, dtype=np.float64)
    if top_threshold is None or entropy_threshold is None:
        return np.ones_like(top_probability, dtype=bool)
    return (top_probability < top_threshold) | (entropy > entropy_threshold)


# -- referral -----------------------------------------------------------------------------


def choose_referral_threshold(score: np.ndarray, y_true: Any,
                              target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY) -> float:
    """The highest malignant-score threshold that flags at least ``target_sensitivity`` of the
    malignant lesions (BCC, MEL, SCC) in ``y_true``; flagged means ``score >= threshold``."""
    if not 0 < target_sensitivity <= 1:
        raise CalibrationError(f"target_sensitivity must lie in (0, 1], got {target_sensitivity}")
    malignant = is_malignant(y_true)
    positives = np.sort(np.asarray(score, dtype=np.float64)[malignant])
    if positives.size == 0:
        raise CalibrationError("no malignant (BCC, MEL, SCC) rows: cannot choose a referral threshold")
    # Flagging every positive from index k upwards keeps n - k of n; the largest k with
    # (n - k) / n >= target is floor(n * (1 - target)), up to floating-point rounding.
    k = int(math.floor(positives.size * (1 - target_sensitivity) + 1e-9))
    threshold = float(positives[k])
    assert (positives >= threshold).mean() >= target_sensitivity - 1e-12
    return threshold


def is_malignant(y_true: Any) -> np.ndarray:
    malignant_idx = [schema.LABEL_TO_INDEX[label] for label in MALIGNANT]
    return np.isin(as_indices(y_true), malignant_idx)


def referral_performance(score: np.ndarray, y_true: Any, threshold: float, groups: Any = None, n_boot: int = 1000,
                         seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
    """Sensitivity and specificity of ``score >= threshold`` for malignancy, with percentile
    intervals from resampling ``groups`` (patients; rows when None)."""
    truth = np.where(is_malignant(y_true), "malignant", "benign")
    flagged = np.where(np.asarray(score, dtype=np.float64) >= threshold, "malignant", "benign")
    ci = bootstrap_ci(truth, flagged, groups, metrics=("recall_malignant", "recall_benign"), n_boot=n_boot,
                      alpha=alpha, seed=seed, labels=("benign", "malignant"))
    return {
        "threshold": float(threshold),
        "sensitivity": ci["recall_malignant"],
        "specificity": ci["recall_benign"],
        "n": int(truth.size),
        "n_malignant": int((truth == "malignant").sum()),
        "n_patients": int(len(set(np.asarray(groups).tolist()))) if groups is not None else int(truth.size),
        "referred_fraction": float((flagged == "malignant").mean()),
    }


# -- the stored configuration -------------------------------------------------------------


@dataclass
class AppConfig:
    """Thresholds the page applies, with how they were chosen (kept beside them as JSON)."""

    uncertainty_top_probability: float | None = UNCALIBRATED_TOP_PROBABILITY
    uncertainty_entropy: float | None = 1.0
    referral_threshold: float | None = None
    target_accuracy: float = DEFAULT_TARGET_ACCURACY
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY
    calibrated: bool = False
    calibration: dict[str, Any] = field(default_factory=dict)
    version: int = CONFIG_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> AppConfig:
        known = {k: v for k, v in state.items() if k in cls.__dataclass_fields__}
        config = cls(**known)
        for name in ("uncertainty_top_probability", "uncertainty_entropy", "referral_threshold"):
            value = getattr(config, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise CalibrationError(f"app config: {name} must be a probability in [0, 1] or null, got {value!r}")
        return config

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> AppConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise CalibrationError(f"app config {path}: {exc}") from None


def calibrate(validation: str | os.PathLike | pd.DataFrame, test: str | os.PathLike | pd.DataFrame | None = None,
              target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
              target_accuracy: float = DEFAULT_TARGET_ACCURACY, min_confident: int = DEFAULT_MIN_CONFIDENT,
              n_boot: int = 1000, seed: int = 0, source: str | None = None) -> AppConfig:
    """Choose both thresholds on ``validation``; report the referral rule on ``test`` if given."""
    val = read_predictions(validation, None if not isinstance(validation, pd.DataFrame) else "validation predictions")
    val_proba = probability_matrix(val)
    uncertainty = choose_uncertainty_thresholds(val_proba, val["true"].astype(str).to_numpy(), target_accuracy,
                                                min_confident)
    val_score = malignant_score(val_proba)
    threshold = choose_referral_threshold(val_score, val["true"].astype(str).to_numpy(), target_sensitivity)
    val_groups = val[schema.PATIENT_ID].to_numpy() if schema.PATIENT_ID in val.columns else None
    calibration: dict[str, Any] = {
        "source": source or val.attrs.get("name"),
        "rule": {
            "uncertainty": f"loosest top-probability / entropy cut whose confident validation rows reach "
                           f"{target_accuracy:.0%} accuracy (at least {min_confident} rows)",
            "referral": f"highest P(BCC)+P(MEL)+P(SCC) cut flagging >= {target_sensitivity:.0%} of malignant "
                        "validation lesions",
        },
        "uncertainty_validation": uncertainty["validation"],
        "referral_validation": referral_performance(val_score, val["true"].astype(str).to_numpy(), threshold,
                                                    val_groups, n_boot=n_boot, seed=seed),
    }
    if test is not None:
        tst = read_predictions(test, None if not isinstance(test, pd.DataFrame) else "test predictions")
        groups = tst[schema.PATIENT_ID].to_numpy() if schema.PATIENT_ID in tst.columns else None
        calibration["referral_test"] = referral_performance(malignant_score(probability_matrix(tst)),
                                                            tst["true"].astype(str).to_numpy(), threshold, groups,
                                                            n_boot=n_boot, seed=seed)
        calibration["referral_test"]["resampled"] = "patients" if groups is not None else "rows"
    return AppConfig(uncertainty_top_probability=uncertainty["top_probability"],
                     uncertainty_entropy=uncertainty["entropy"], referral_threshold=threshold,
                     target_accuracy=float(target_accuracy), target_sensitivity=float(target_sensitivity),
                     calibrated=True, calibration=calibration)
