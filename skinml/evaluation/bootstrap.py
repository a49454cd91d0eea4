"""Patient-level bootstrap confidence intervals for confusion-matrix metrics.

Images of one patient are correlated (up to 10 images, often of the same lesion), so resampling
images would pretend the test set holds more independent evidence than it does and give
intervals that are too narrow. We resample patients with replacement and keep all rows of each
drawn patient.

Every supported metric is a function of the confusion matrix, so the bootstrap never loops over
resamples in Python: each patient's confusion counts are computed once, a (n_boot, n_patients)
matrix of draw multiplicities is built with one ``bincount``, and a single matrix product gives
the confusion matrix of every resample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from skinml.data.schema import LABELS
from skinml.evaluation.metrics import as_indices

__all__ = ["SUPPORTED_METRICS", "bootstrap_ci", "flatten_ci", "paired_bootstrap_diff", "replicated_bootstrap_diff"]

#: Metric names accepted by :func:`bootstrap_ci`, besides ``recall_<LABEL>``.
SUPPORTED_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


def _accuracy(cm: np.ndarray) -> np.ndarray:
    total = cm.sum(axis=(1, 2))
    return np.trace(cm, axis1=1, axis2=2) / np.maximum(total, 1)


def _recalls(cm: np.ndarray) -> np.ndarray:
    """(B, C) recall per class; NaN where the resample holds no true sample of the class."""
    support = cm.sum(axis=2)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, tp / support, np.nan)


def _balanced_accuracy(cm: np.ndarray) -> np.ndarray:
    # Mean over classes present in each resample, matching compute_metrics.
    recalls = _recalls(cm)
    present = ~np.isnan(recalls)
    return np.nansum(recalls, axis=1) / np.maximum(present.sum(axis=1), 1)


def _macro_f1(cm: np.ndarray) -> np.ndarray:
    # Mean F1 over classes present in y_true, same convention as balanced accuracy.
    support = cm.sum(axis=2)
    predicted = cm.sum(axis=1)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    denom = support + predicted
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(denom > 0, 2 * tp / denom, 0.0)
    present = support > 0
    return np.where(present, f1, 0.0).sum(axis=1) / np.maximum(present.sum(axis=1), 1)


def _metric_fn(name: str, labels: Sequence[str]) -> Callable[[np.ndarray], np.ndarray]:
    table: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "accuracy": _accuracy,
        "balanced_accuracy": _balanced_accuracy,
        "macro_f1": _macro_f1,
    }
    if name in table:
        return table[name]
    if name.startswith("recall_") and name[len("recall_") :] in labels:
        k = list(labels).index(name[len("recall_") :])
        return lambda cm: _recalls(cm)[:, k]
    raise ValueError(
        f"unsupported bootstrap metric {name!r}; use one of {list(SUPPORTED_METRICS)} "
        f"or recall_<LABEL> with LABEL in {list(labels)}"
    )


def _draw_counts(n_groups: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n_groups) multiplicity of each group in each resample of n_groups draws."""
    draws = rng.integers(0, n_groups, size=(n_boot, n_groups))
    offsets = (np.arange(n_boot) * n_groups)[:, None]
    return np.bincount((draws + offsets).ravel(), minlength=n_boot * n_groups).reshape(n_boot, n_groups)


def bootstrap_ci(
    y_true: Any,
    y_pred: Any,
    groups: Any,
    metrics: Iterable[str] = ("accuracy", "balanced_accuracy"),
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    labels: Sequence[str] = LABELS,
) -> dict[str, dict[str, float]]:
    """Percentile bootstrap intervals, resampling ``groups`` (patients) with replacement.

    ``y_true`` / ``y_pred``: class indices (or label strings) in ``labels`` order; ``groups``:
    one patient id per row, or ``None`` to resample rows independently. ``metrics``: names from
    :data:`SUPPORTED_METRICS` or ``recall_<LABEL>``.

    Returns ``{metric: {"estimate", "low", "high", "n_boot", "alpha"}}`` where ``estimate`` is
    the metric on the full data, ``low``/``high`` the ``alpha/2`` and ``1 - alpha/2`` quantiles
    of the resampled values, and ``n_boot`` the number of resamples on which the metric was
    defined (a ``recall_MEL`` resample without any MEL patient is dropped, not counted as 0).
    The same ``seed`` gives the same intervals.
    """
    labels = tuple(labels)
    yt = as_indices(y_true, labels)
    yp = as_indices(y_pred, labels)
    if yt.shape != yp.shape:
        raise ValueError(f"y_true and y_pred differ in length: {yt.size} vs {yp.size}")
    _check(yt, n_boot, alpha)
    group_idx, n_groups = _group_index(groups, yt.size)
    fns = {name: _metric_fn(name, labels) for name in metrics}
    group_cm = _group_confusion(yt, yp, group_idx, n_groups, len(labels))
    counts = _draw_counts(n_groups, n_boot, np.random.default_rng(seed))
    full_cm, boot_cm = _full_and_boot(group_cm, counts, len(labels))

    result: dict[str, dict[str, float]] = {}
    for name, fn in fns.items():
        estimate = float(fn(full_cm)[0])
        values = fn(boot_cm)
        values = values[~np.isnan(values)]
        if values.size:
            low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
        else:
            low = high = float("nan")
        result[name] = {
            "estimate": estimate,
            "low": float(low),
            "high": float(high),
            "n_boot": int(values.size),
            "alpha": float(alpha),
        }
    return result


def paired_bootstrap_diff(
    y_true: Any,
    y_pred_a: Any,
    y_pred_b: Any,
    groups: Any,
    metrics: Iterable[str] = ("balanced_accuracy",),
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    labels: Sequence[str] = LABELS,
) -> dict[str, dict[str, float]]:
    """Patient bootstrap of the difference ``metric(a) - metric(b)`` between two models' predictions
    of the same rows.

    Both models are scored on the *same* resample of patients each time, so the interval is that
    of the paired difference: much narrower than two separate intervals when the models err on
    the same hard cases. Returns ``{metric: {"a", "b", "estimate", "low", "high", "p_a_better",
    "n_boot", "alpha"}}``: the two full-data values, their difference, its percentile interval and
    the share of resamples in which ``a`` scores strictly higher.
    """
    sizes = [np.asarray(y).size for y in (y_true, y_pred_a, y_pred_b)]
    if len(set(sizes)) > 1:
        raise ValueError(f"y_true, y_pred_a and y_pred_b differ in length: {', '.join(map(str, sizes))}")
    return replicated_bootstrap_diff(y_true, [y_pred_a], [y_pred_b], groups, metrics=metrics, n_boot=n_boot,
                                     alpha=alpha, seed=seed, labels=labels)


def replicated_bootstrap_diff(
    y_true: Any,
    preds_a: Sequence[Any],
    preds_b: Sequence[Any],
    groups: Any,
    metrics: Iterable[str] = ("balanced_accuracy",),
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    labels: Sequence[str] = LABELS,
) -> dict[str, dict[str, float]]:
    """:func:`paired_bootstrap_diff` for two configurations each trained several times (e.g. with
    different seeds): the difference of the two sides' *mean* metric over their runs.

    ``preds_a`` / ``preds_b``: one prediction array per run of that side, all of the same rows.
    Every run of both sides is scored on the same resample of patients, and each resample's
    difference is ``mean_r metric(a_r) - mean_r metric(b_r)``, so the interval covers patient
    sampling with the seed-to-seed spread averaged out (not the spread itself: that is what the
    per-run figures show). ``"a"`` and ``"b"`` are the sides' mean full-data values. With one run
    a side this is exactly :func:`paired_bootstrap_diff`.
    """
    labels = tuple(labels)
    if not len(preds_a) or not len(preds_b):
        raise ValueError(f"each side needs at least one run's predictions, got {len(preds_a)} and {len(preds_b)}")
    yt = as_indices(y_true, labels)
    sides = [[as_indices(y, labels) for y in preds] for preds in (preds_a, preds_b)]
    for side, preds in zip("ab", sides):
        for r, y in enumerate(preds):
            if y.shape != yt.shape:
                raise ValueError(f"run {r} of side {side} predicts {y.size} rows, y_true has {yt.size}")
    _check(yt, n_boot, alpha)
    group_idx, n_groups = _group_index(groups, yt.size)
    fns = {name: _metric_fn(name, labels) for name in metrics}
    counts = _draw_counts(n_groups, n_boot, np.random.default_rng(seed))
    cms = [[_full_and_boot(_group_confusion(yt, y, group_idx, n_groups, len(labels)), counts, len(labels))
            for y in preds] for preds in sides]
    result: dict[str, dict[str, float]] = {}
    for name, fn in fns.items():
        full = [float(np.mean([fn(f)[0] for f, _ in side])) for side in cms]
        boot = [np.mean([fn(b) for _, b in side], axis=0) for side in cms]
        diff = boot[0] - boot[1]
        diff = diff[~np.isnan(diff)]
        low, high = np.quantile(diff, [alpha / 2, 1 - alpha / 2]) if diff.size else (np.nan, np.nan)
        result[name] = {"a": full[0], "b": full[1], "estimate": full[0] - full[1], "low": float(low),
                        "high": float(high), "p_a_better": float((diff > 0).mean()) if diff.size else float("nan"),
                        "n_boot": int(diff.size), "alpha": float(alpha)}
    return result


def _check(yt: np.ndarray, n_boot: int, alpha: float) -> None:
    if yt.size == 0:
        raise ValueError("cannot bootstrap an empty set")
    if n_boot < 1:
        raise ValueError("n_boot must be at least 1")
    if not 0 < alpha < 1:
        raise ValueError("alpha must lie in (0, 1)")


def _group_index(groups: Any, n_rows: int) -> tuple[np.ndarray, int]:
    """Each row's group as 0..G-1 (rows are their own groups when ``groups`` is None), and G."""
    if groups is None:
        return np.arange(n_rows), n_rows
    g = np.asarray(groups)
    if g.shape != (n_rows,):
        raise ValueError(f"groups must have one entry per row ({n_rows}), got shape {g.shape}")
    _, group_idx = np.unique(g, return_inverse=True)
    group_idx = group_idx.ravel()
    return group_idx, int(group_idx.max()) + 1


def _group_confusion(yt: np.ndarray, yp: np.ndarray, group_idx: np.ndarray, n_groups: int,
                     n_classes: int) -> np.ndarray:
    """Per-group confusion counts, flattened: (G, C*C)."""
    group_cm = np.zeros((n_groups, n_classes * n_classes), dtype=np.int64)
    np.add.at(group_cm, (group_idx, yt * n_classes + yp), 1)
    return group_cm


def _full_and_boot(group_cm: np.ndarray, counts: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The full data's confusion matrix (1, C, C) and every resample's (B, C, C)."""
    full = group_cm.sum(axis=0).reshape(1, n_classes, n_classes)
    return full, (counts @ group_cm).reshape(len(counts), n_classes, n_classes)


def flatten_ci(ci: Mapping[str, Mapping[str, float]], prefix: str = "test_") -> dict[str, float]:
    """``{"test_accuracy_low": ..., "test_accuracy_high": ...}`` for logging next to the metrics."""
    flat: dict[str, float] = {}
    for name, values in ci.items():
        for bound in ("low", "high"):
            value = values.get(bound)
            if value is not None and not np.isnan(value):
                flat[f"{prefix}{name}_{bound}"] = float(value)
    return flat
