"""Evaluation figures: confusion matrix, ROC curves, reliability diagram.

Figures are built with ``matplotlib.figure.Figure`` directly instead of pyplot: nothing touches
a display or the global backend, and figures are not held in pyplot's registry, so a training
loop that plots every epoch cannot leak memory. The returned figures can be saved with
:func:`save_figure` or passed to ``mlflow.log_figure``.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import auc as area_under_curve
from sklearn.metrics import roc_curve

from skinml.data.schema import LABEL_NAMES, LABELS
from skinml.evaluation.metrics import ECE_BINS, as_indices, short_name

__all__ = ["new_figure", "plot_confusion_matrix", "plot_reliability", "plot_roc_curves", "save_figure"]


def new_figure(width: float, height: float) -> Figure:
    """A pyplot-free figure with an Agg canvas and constrained layout."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas: rendering never needs a GUI backend
    return fig


def _class_tick(label: str, width: int = 16) -> str:
    # Code on the first line, full name wrapped below: readable without a separate legend.
    name = LABEL_NAMES.get(label)
    if not name or name == label:
        return label
    return label + "\n" + "\n".join(textwrap.wrap(name, width))


def plot_confusion_matrix(
    cm: Any,
    labels: Sequence[str] = LABELS,
    normalized: bool = False,
    title: str | None = None,
) -> Figure:
    """Heat map of a confusion matrix (rows = true, columns = predicted), values in the cells.

    With ``normalized=True`` rows are divided by their sums (idempotent, so an already
    row-normalised matrix is fine too); when ``cm`` holds counts, each cell shows the fraction
    and the count below it.
    """
    m = np.asarray(cm, dtype=np.float64)
    labels = list(labels)
    if m.shape != (len(labels), len(labels)):
        raise ValueError(f"cm must be {len(labels)}x{len(labels)}, got {m.shape}")
    is_counts = bool(np.all(m == np.round(m)) and m.sum(axis=1).max(initial=0) > 1)
    counts = m if is_counts else None
    if normalized:
        rows = m.sum(axis=1, keepdims=True)
        m = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)

    fig = new_figure(7.5, 6.8)
    ax = fig.add_subplot()
    vmax = 1.0 if normalized else max(float(m.max()), 1.0)
    image = ax.imshow(m, cmap="Blues", vmin=0.0, vmax=vmax)
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of true class" if normalized else "count")

    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            value = m[i, j]
            if normalized:
                text = f"{value:.2f}" + (f"\n({int(counts[i, j])})" if counts is not None else "")
            else:
                text = f"{int(round(value))}" if is_counts else f"{value:.2f}"
            dark = value > 0.55 * vmax
            ax.text(j, i, text, ha="center", va="center", fontsize=9, color="white" if dark else "black")

    ticks = [_class_tick(label) for label in labels]
    ax.set_xticks(range(len(labels)), ticks, fontsize=7)
    ax.set_yticks(range(len(labels)), ticks, fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    default = "Confusion matrix (row-normalised)" if normalized else "Confusion matrix (counts)"
    ax.set_title(title or default)
    return fig


def plot_roc_curves(y_true: Any, proba: Any, labels: Sequence[str] = LABELS) -> Figure:
    """One-vs-rest ROC curve of every class present in ``y_true``, AUC in the legend."""
    labels = list(labels)
    y = as_indices(y_true, labels)
    p = np.asarray(proba, dtype=np.float64)
    if p.shape != (y.size, len(labels)):
        raise ValueError(f"proba must have shape ({y.size}, {len(labels)}), got {p.shape}")

    fig = new_figure(6.5, 6.0)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    aucs, skipped = [], []
    for k, label in enumerate(labels):
        positives = y == k
        # A curve needs both positives and negatives.
        if not positives.any() or positives.all():
            skipped.append(label)
            continue
        fpr, tpr, _ = roc_curve(positives, p[:, k])
        auc = float(area_under_curve(fpr, tpr))
        aucs.append(auc)
        ax.plot(fpr, tpr, linewidth=1.6, label=f"{label} {short_name(label)} (AUC {auc:.3f})")
    title = "ROC curves, one-vs-rest"
    if aucs:
        title += f" (macro AUC {np.mean(aucs):.3f})"
    ax.set_title(title)
    if skipped:
        ax.text(0.98, 0.02, "no curve: " + ", ".join(skipped), transform=ax.transAxes, ha="right", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=8, bbox_to_anchor=(1.0, 0.06))
    return fig


def plot_reliability(metrics_or_bins: Mapping[str, Any]) -> Figure:
    """Reliability diagram: accuracy against mean confidence per bin, ECE in the title.

    Accepts the dict of :func:`skinml.evaluation.metrics.compute_metrics` (uses its
    ``reliability`` and ``ece``) or the ``reliability`` dict alone (ECE is recomputed from it).
    """
    bins = metrics_or_bins.get("reliability", metrics_or_bins)
    edges = np.asarray(bins["bin_edges"], dtype=np.float64)
    count = np.asarray(bins["count"], dtype=np.float64)
    acc = np.asarray([np.nan if a is None else a for a in bins["accuracy"]], dtype=np.float64)
    conf = np.asarray([np.nan if c is None else c for c in bins["confidence"]], dtype=np.float64)
    ece = metrics_or_bins.get("ece")
    if ece is None:
        filled = count > 0
        ece = float(np.sum(count[filled] * np.abs(acc[filled] - conf[filled])) / max(count.sum(), 1))

    fig = new_figure(6.0, 6.5)
    ax, ax_hist = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    widths = np.diff(edges)
    filled = count > 0
    ax.bar(edges[:-1][filled], acc[filled], width=widths[filled], align="edge", color="tab:blue",
           alpha=0.8, edgecolor="black", linewidth=0.6, label="accuracy")
    # Mean confidence as a marker, joined to the bar top: the segment is the bin's calibration
    # gap, readable whether the model is over- or under-confident.
    centres = edges[:-1][filled] + widths[filled] / 2
    ax.vlines(centres, acc[filled], conf[filled], color="tab:red", linewidth=1.5)
    ax.plot(centres, conf[filled], "o", color="tab:red", markersize=4, label="mean confidence")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"Reliability of top-1 confidence (ECE = {ece:.3f}, {len(count) or ECE_BINS} bins)")

    ax_hist.bar(edges[:-1], count, width=widths, align="edge", color="grey", edgecolor="black", linewidth=0.6)
    ax_hist.set_xlabel("top-1 confidence")
    ax_hist.set_ylabel("samples")
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` as PNG (creating parent folders) and release it; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    # Only pyplot-managed figures need closing; don't import pyplot just to find that out.
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(fig)
    return path
