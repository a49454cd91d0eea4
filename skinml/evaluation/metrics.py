"""Classification metrics for the 6-class problem, computed from labels and probabilities.

Everything here is pure numpy (plus scikit-learn for the binary ROC AUC), returns plain Python
types, and never raises because a class is missing from a small test split: PAD-UFES-20 has
only 52 MEL images, so a patient-level test split can easily hold none or never predict one.
Undefined quantities are ``float("nan")`` and explained in ``metrics["notes"]``; use
:func:`to_jsonable` before writing strict JSON (it turns NaN into ``null``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from skinml.data.schema import LABEL_NAMES, LABELS, MALIGNANT_LABELS

__all__ = [
    "ECE_BINS",
    "LOG_LOSS_EPS",
    "as_indices",
    "compute_metrics",
    "confusion_matrix",
    "expected_calibration_error",
    "flatten_metrics",
    "format_report",
    "short_name",
    "to_jsonable",
]

#: Number of equal-width confidence bins for the expected calibration error.
ECE_BINS = 15
#: Probabilities are clipped to [eps, 1 - eps] so one confident mistake gives a large but
#: finite log loss instead of infinity.
LOG_LOSS_EPS = 1e-15
#: Rows whose probabilities sum further than this from 1 are rejected: almost always logits
#: or unnormalised scores passed by mistake, which would silently corrupt AUC, ECE and log loss.
_PROBA_SUM_TOL = 1e-3

_NAN = float("nan")


def as_indices(y: Any, labels: Sequence[str] = LABELS) -> np.ndarray:
    """Return ``y`` as a 1-D int array of class indices into ``labels``.

    Accepts indices or label strings (e.g. ``"MEL"``), so callers holding either form get the
    same result; out-of-range indices and unknown labels raise ``ValueError``.
    """
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-D array of labels, got shape {arr.shape}")
    if arr.dtype.kind in "USO":
        index = {label: i for i, label in enumerate(labels)}
        unknown = sorted({str(v) for v in arr if v not in index})
        if unknown:
            raise ValueError(f"unknown labels {unknown}; expected one of {list(labels)}")
        return np.array([index[v] for v in arr], dtype=np.int64)
    if arr.size and arr.dtype.kind == "f" and not np.all(np.mod(arr, 1) == 0):
        raise ValueError("class indices must be integers")
    idx = arr.astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= len(labels)):
        raise ValueError(f"class indices must lie in [0, {len(labels) - 1}], got {idx.min()}..{idx.max()}")
    return idx


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts with rows = true class and columns = predicted class, always ``n_classes`` square."""
    flat = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes)


def _check_proba(proba: Any, n: int, n_classes: int) -> np.ndarray:
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim != 2 or p.shape != (n, n_classes):
        raise ValueError(f"proba must have shape ({n}, {n_classes}), got {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("proba contains NaN or infinite values")
    if p.min() < 0:
        raise ValueError("proba contains negative values: pass probabilities, not logits")
    sums = p.sum(axis=1)
    if n and np.max(np.abs(sums - 1.0)) > _PROBA_SUM_TOL:
        raise ValueError("proba rows must sum to 1 (apply softmax to logits first)")
    # Deliberately not renormalised here: dividing by sums that differ from 1 by an ulp breaks
    # exact ties between rows, which changes tie-sensitive ROC AUC.
    return p


def _safe_div(num: float, den: float) -> float:
    return float(num) / float(den) if den else _NAN


def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS
) -> tuple[float, dict[str, Any]]:
    """ECE of top-1 confidence over ``n_bins`` equal-width bins, and the per-bin data.

    Bins are right-closed, ``(lo, hi]``, with the first one also taking 0. ECE is
    ``sum_b n_b / N * |accuracy_b - mean confidence_b|``; empty bins contribute nothing and
    report NaN accuracy/confidence.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # digitize with right=True against the inner edges gives the (lo, hi] bin of each value.
    bin_idx = np.digitize(confidence, edges[1:-1], right=True)
    count = np.bincount(bin_idx, minlength=n_bins)
    conf_sum = np.bincount(bin_idx, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(bin_idx, weights=correct, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(count > 0, acc_sum / count, np.nan)
        conf = np.where(count > 0, conf_sum / count, np.nan)
    n = confidence.size
    ece = float(np.sum(np.abs(acc_sum - conf_sum)) / n) if n else _NAN
    bins = {
        "n_bins": int(n_bins),
        "bin_edges": [float(e) for e in edges],
        "count": [int(c) for c in count],
        "accuracy": [float(a) for a in acc],
        "confidence": [float(c) for c in conf],
    }
    return ece, bins


def compute_metrics(y_true: Any, proba: Any, labels: Sequence[str] = LABELS) -> dict[str, Any]:
    """All evaluation metrics of one prediction set, as a JSON-able dict.

    ``y_true``: N class indices (or label strings); ``proba``: (N, C) probabilities in
    ``labels`` order. The predicted class is the argmax of ``proba``.

    Returned keys:

    - ``n``, ``labels``, ``accuracy``.
    - ``balanced_accuracy``: mean recall over the classes *present in y_true* (a class with no
      true samples has no recall; averaging a 0 for it would punish the model for the split).
      Same convention as scikit-learn's ``balanced_accuracy_score``.
    - ``auc_macro_ovr`` / ``auc_weighted_ovr``: one-vs-rest ROC AUC per class present in
      ``y_true``, averaged plainly / weighted by support; classes without true samples are
      skipped with a note; NaN when fewer than 2 classes are present.
    - ``log_loss``: mean negative log probability of the true class over all C classes,
      probabilities clipped to ``[LOG_LOSS_EPS, 1 - LOG_LOSS_EPS]``.
    - ``ece`` and ``reliability`` (see :func:`expected_calibration_error`, 15 bins).
    - ``per_class``: ``{label: {precision, recall, specificity, f1, support, auc}}``. A class
      never predicted gets precision 0.0 (with a note); recall, F1 and AUC of a class with
      no true samples are NaN.
    - ``confusion_matrix``: counts, rows = true, columns = predicted, C x C;
      ``confusion_matrix_normalized``: each row divided by its support (rows without support 0).
    - ``melanoma``: ``{recall, n_mel, n_called_benign, n_missed}``; ``n_called_benign`` counts
      MEL cases predicted as a class outside ``MALIGNANT_LABELS`` (the dangerous miss),
      ``n_missed`` those predicted as anything but MEL. ``None`` if ``labels`` has no MEL.
    - ``notes``: human-readable explanations of every skipped or undefined value.
    """
    labels = tuple(labels)
    n_classes = len(labels)
    y = as_indices(y_true, labels)
    n = int(y.size)
    if n == 0:
        raise ValueError("cannot compute metrics on an empty set")
    p = _check_proba(proba, n, n_classes)
    y_pred = p.argmax(axis=1)
    notes: list[str] = []

    cm = confusion_matrix(y, y_pred, n_classes)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    tp = np.diag(cm)
    present = support > 0

    for k in np.flatnonzero(~present):
        notes.append(
            f"{labels[k]} has no true samples: its recall, F1 and AUC are undefined (NaN) "
            "and it is left out of balanced_accuracy."
        )

    per_class: dict[str, dict[str, Any]] = {}
    for k, label in enumerate(labels):
        fp = int(predicted[k] - tp[k])
        negatives = n - int(support[k])
        if predicted[k] == 0:
            precision = 0.0
            notes.append(f"{label} was never predicted: its precision is reported as 0.0.")
        else:
            precision = float(tp[k] / predicted[k])
        recall = _safe_div(tp[k], support[k])
        if math.isnan(recall):
            f1 = _NAN
        elif precision + recall == 0:
            f1 = 0.0
        else:
            f1 = 2 * precision * recall / (precision + recall)
        per_class[label] = {
            "precision": precision,
            "recall": recall,
            "specificity": _safe_div(negatives - fp, negatives),
            "f1": float(f1),
            "support": int(support[k]),
            "auc": _NAN,
        }

    recalls = tp[present] / support[present]
    balanced_accuracy = float(recalls.mean())

    # One-vs-rest AUC computed per class so a class absent from y_true is skipped rather than
    # making scikit-learn's multiclass roc_auc_score raise.
    auc_macro = auc_weighted = _NAN
    if present.sum() >= 2:
        aucs, weights = [], []
        for k in np.flatnonzero(present):
            auc = float(roc_auc_score(y == k, p[:, k]))
            per_class[labels[k]]["auc"] = auc
            aucs.append(auc)
            weights.append(support[k])
        auc_macro = float(np.mean(aucs))
        auc_weighted = float(np.average(aucs, weights=weights))
        skipped = [labels[k] for k in np.flatnonzero(~present)]
        if skipped:
            notes.append(
                f"AUC: skipped {', '.join(skipped)} (no true samples); macro and weighted AUC "
                f"are over the {int(present.sum())} classes present."
            )
    else:
        notes.append("AUC: fewer than 2 classes present in y_true, AUC is undefined (NaN).")

    # Float32 softmax rows sum to 1 only approximately; renormalise for the log loss only.
    p_clipped = np.clip(p / p.sum(axis=1, keepdims=True), LOG_LOSS_EPS, 1.0 - LOG_LOSS_EPS)
    log_loss = float(-np.mean(np.log(p_clipped[np.arange(n), y])))

    ece, reliability = expected_calibration_error(p.max(axis=1), y_pred == y)

    with np.errstate(invalid="ignore", divide="ignore"):
        cm_norm = np.where(support[:, None] > 0, cm / np.maximum(support, 1)[:, None], 0.0)

    melanoma: dict[str, Any] | None = None
    if "MEL" in labels:
        mel = labels.index("MEL")
        benign = np.array([label not in MALIGNANT_LABELS for label in labels])
        mel_rows = cm[mel]
        melanoma = {
            "recall": _safe_div(mel_rows[mel], support[mel]),
            "n_mel": int(support[mel]),
            "n_called_benign": int(mel_rows[benign].sum()),
            "n_missed": int(support[mel] - mel_rows[mel]),
        }
    else:
        notes.append("MEL is not among the labels: melanoma summary skipped.")

    return {
        "n": n,
        "labels": list(labels),
        "accuracy": float(tp.sum() / n),
        "balanced_accuracy": balanced_accuracy,
        "auc_macro_ovr": auc_macro,
        "auc_weighted_ovr": auc_weighted,
        "log_loss": log_loss,
        "ece": ece,
        "reliability": reliability,
        "per_class": per_class,
        "confusion_matrix": cm.astype(int).tolist(),
        "confusion_matrix_normalized": cm_norm.astype(float).tolist(),
        "melanoma": melanoma,
        "notes": notes,
    }


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or value is None:
        return False
    try:
        return not math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "test_") -> dict[str, float]:
    """Scalar metrics with MLflow-friendly names, e.g. ``test_accuracy``, ``test_recall_MEL``.

    Names: ``{prefix}n``, ``accuracy``, ``balanced_accuracy``, ``auc_macro``, ``auc_weighted``,
    ``log_loss``, ``ece``; per class ``precision_<L>``, ``recall_<L>``, ``specificity_<L>``,
    ``f1_<L>``, ``support_<L>``, ``auc_<L>``; ``mel_n``, ``mel_called_benign``, ``mel_missed``.
    NaN values are left out (MLflow would store them, but they break comparisons and plots).
    """
    top = {
        "n": "n",
        "accuracy": "accuracy",
        "balanced_accuracy": "balanced_accuracy",
        "auc_macro_ovr": "auc_macro",
        "auc_weighted_ovr": "auc_weighted",
        "log_loss": "log_loss",
        "ece": "ece",
    }
    flat: dict[str, float] = {}
    for key, name in top.items():
        flat[name] = metrics.get(key)
    for label, values in (metrics.get("per_class") or {}).items():
        for stat in ("precision", "recall", "specificity", "f1", "support", "auc"):
            flat[f"{stat}_{label}"] = values.get(stat)
    mel = metrics.get("melanoma") or {}
    flat["mel_n"] = mel.get("n_mel")
    flat["mel_called_benign"] = mel.get("n_called_benign")
    flat["mel_missed"] = mel.get("n_missed")
    return {f"{prefix}{name}": float(value) for name, value in flat.items() if _is_number(value)}


def to_jsonable(obj: Any) -> Any:
    """Deep copy of ``obj`` with NaN/inf replaced by ``None`` and numpy scalars made Python.

    ``json.dumps`` writes NaN as a bare ``NaN`` token that strict parsers reject.
    """
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _fmt(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if _is_number(value) else "n/a"


def format_report(
    metrics: Mapping[str, Any],
    title: str = "Evaluation",
    ci: Mapping[str, Mapping[str, float]] | None = None,
) -> str:
    """A fixed-width text report: overall numbers, a per-class table, the melanoma line, notes.

    ``ci`` is an optional :func:`skinml.evaluation.bootstrap.bootstrap_ci` result; intervals of
    metrics it holds are printed next to the point estimates.
    """
    ci = ci or {}

    def overall(name: str, key: str) -> str:
        line = f"  {name:<26}{_fmt(metrics.get(key), 4):>8}"
        if key in ci:
            c = ci[key]
            pct = round(100 * (1 - c.get("alpha", 0.05)))
            line += f"   [{_fmt(c['low'], 4)}, {_fmt(c['high'], 4)}] {pct}% CI, patient bootstrap"
        return line

    per_class = metrics.get("per_class") or {}
    n_present = sum(1 for v in per_class.values() if v.get("support", 0) > 0)
    lines = [title, "=" * len(title), f"  {'samples':<26}{metrics.get('n', 0):>8}"]
    lines.append(overall("accuracy", "accuracy"))
    lines.append(overall(f"balanced accuracy ({n_present} cl.)", "balanced_accuracy"))
    lines.append(overall("ROC AUC macro (OvR)", "auc_macro_ovr"))
    lines.append(overall("ROC AUC weighted (OvR)", "auc_weighted_ovr"))
    lines.append(overall("log loss", "log_loss"))
    lines.append(overall(f"ECE ({ECE_BINS} bins)", "ece"))

    name_width = max([len("class")] + [len(short_name(lbl)) for lbl in per_class])
    header = (
        f"  {'':<4}{'class':<{name_width}}  {'precision':>9}  {'recall':>7}  {'specif.':>7}"
        f"  {'F1':>6}  {'AUC':>6}  {'support':>7}"
    )
    lines += ["", header, "  " + "-" * (len(header) - 2)]
    for label, v in per_class.items():
        lines.append(
            f"  {label:<4}{short_name(label):<{name_width}}  {_fmt(v['precision']):>9}"
            f"  {_fmt(v['recall']):>7}  {_fmt(v['specificity']):>7}  {_fmt(v['f1']):>6}"
            f"  {_fmt(v.get('auc')):>6}  {v['support']:>7}"
        )

    mel = metrics.get("melanoma")
    if mel:
        benign = "/".join(lbl for lbl in metrics.get("labels", LABELS) if lbl not in MALIGNANT_LABELS)
        found = mel["n_mel"] - mel["n_missed"]
        lines += [
            "",
            f"  Melanoma: {found}/{mel['n_mel']} found (recall {_fmt(mel['recall'])}); "
            f"{mel['n_missed']} missed, of which {mel['n_called_benign']} called benign ({benign}).",
        ]
    notes = metrics.get("notes") or []
    if notes:
        lines += ["", "  Notes:"] + [f"  - {note}" for note in notes]
    return "\n".join(lines)


def short_name(label: str) -> str:
    """Class name without its parenthetical, for tables and legends."""
    # The SCC name carries a long parenthetical that would blow up the table width.
    return LABEL_NAMES.get(label, label).split(" (")[0]
