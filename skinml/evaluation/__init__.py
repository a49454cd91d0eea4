"""Pure evaluation library: metrics, patient-level bootstrap CIs, figures, run comparison.

Nothing here loads models or talks to MLflow; callers pass labels, probabilities and patient
ids, and log the returned dicts, figures and tables wherever they like.
"""

from skinml.evaluation.bootstrap import (
    SUPPORTED_METRICS,
    bootstrap_ci,
    flatten_ci,
    paired_bootstrap_diff,
    replicated_bootstrap_diff,
)
from skinml.evaluation.compare import (
    comparison_table,
    metadata_markdown,
    per_run_table,
    plot_comparison,
    results_markdown,
    to_markdown,
)
from skinml.evaluation.metrics import compute_metrics, flatten_metrics, format_report, to_jsonable
from skinml.evaluation.plots import plot_confusion_matrix, plot_reliability, plot_roc_curves, save_figure

__all__ = [
    "SUPPORTED_METRICS",
    "bootstrap_ci",
    "paired_bootstrap_diff",
    "replicated_bootstrap_diff",
    "comparison_table",
    "compute_metrics",
    "flatten_ci",
    "flatten_metrics",
    "format_report",
    "metadata_markdown",
    "per_run_table",
    "plot_comparison",
    "plot_confusion_matrix",
    "plot_reliability",
    "plot_roc_curves",
    "results_markdown",
    "save_figure",
    "to_jsonable",
    "to_markdown",
]
