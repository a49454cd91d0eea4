"""Compare evaluated runs: per-run and per-configuration tables, a bar chart, markdown output.

A "row" is a plain dict describing one evaluated run (typically built from an MLflow run's
params and metrics), e.g.::

    {"run_id": "ab12", "model": "fusion", "recipe": "lite0", "imbalance": "sampler", "seed": 0,
     "test_accuracy": 0.71, "test_accuracy_low": 0.65, "test_accuracy_high": 0.77,
     "test_balanced_accuracy": 0.66, ..., "test_auc_macro": 0.90, "test_recall_MEL": 0.5,
     "best_val_bacc": 0.68}

MLflow hands params back as strings, so every metric is coerced to a number and seeds to int
where possible. Missing keys are fine: columns appear only for metrics some row has.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from skinml.data.schema import LABELS
from skinml.evaluation.plots import new_figure

__all__ = [
    "GROUP_KEYS",
    "comparison_table",
    "metadata_markdown",
    "per_run_table",
    "plot_comparison",
    "results_markdown",
    "summary_metrics",
    "to_markdown",
]

#: A configuration is a model and its resolved recipe (``config``: a short hash of every recipe
#: field, so runs with different overrides are never pooled) on one split; seeds are its
#: repetitions. ``recipe`` and ``imbalance`` are there to be read, ``config`` decides.
GROUP_KEYS: tuple[str, ...] = ("model", "recipe", "imbalance", "config", "split")
_MISSING_KEY = "-"
_CI_METRICS = ("test_accuracy", "test_balanced_accuracy")


def summary_metrics(labels: Sequence[str] = LABELS) -> list[str]:
    """Metric names aggregated per configuration, in display order."""
    return (
        ["test_accuracy", "test_balanced_accuracy", "test_auc_macro"]
        + [f"test_recall_{label}" for label in labels]
        + ["best_val_bacc", "test_complete_metadata_balanced_accuracy", "test_complete_metadata_auc_macro",
           "test_complete_metadata_recall_MEL", "test_permuted_metadata_balanced_accuracy",
           "test_permuted_metadata_complete_balanced_accuracy", "evalval_complete_metadata_balanced_accuracy"]
    )


def _ci_columns() -> list[str]:
    return [f"{m}_{bound}" for m in _CI_METRICS for bound in ("low", "high")]


def _seed_value(value: Any) -> Any:
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        return value
    if math.isnan(as_float):
        return None
    return int(as_float) if as_float.is_integer() else as_float


def _seed_order(seed: Any) -> tuple[bool, Any]:
    # Numeric seeds first in numeric order, then anything else by its text.
    numeric = isinstance(seed, (int, float))
    return (not numeric, seed if numeric else str(seed))


def _sort_key(column: pd.Series) -> pd.Series:
    if column.name == "seed":
        # Seeds can mix ints and None (object dtype), which plain sorting cannot compare.
        return column.map(lambda v: float(v) if isinstance(v, (int, float)) else math.inf).astype(float)
    return column


def _group_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return _MISSING_KEY
    return str(value)


def _frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame([dict(r) for r in rows])
    for key in GROUP_KEYS:
        if key not in df.columns:
            df[key] = _MISSING_KEY
        # groupby drops NaN keys by default and a None recipe would silently vanish.
        df[key] = df[key].map(_group_value)
    if "seed" in df.columns:
        df["seed"] = df["seed"].map(_seed_value).astype(object)
    for column in summary_metrics() + _ci_columns():
        if column in df.columns:
            df[column] = pd.to_numeric(df[column], errors="coerce")
    return df


def per_run_table(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """One line per run: identifiers, then the summary metrics and CI bounds it has.

    Sorted by configuration then seed so the seeds of one configuration sit together.
    """
    df = _frame(rows)
    if df.empty:
        return df
    ids = [c for c in ("run_id", *GROUP_KEYS, "seed") if c in df.columns]
    metric_cols = []
    for m in summary_metrics():
        metric_cols += [c for c in (m, f"{m}_low", f"{m}_high") if c in df.columns]
    df = df[ids + metric_cols]
    sort_by = [*GROUP_KEYS] + (["seed"] if "seed" in df.columns else [])
    return df.sort_values(sort_by, key=_sort_key, kind="stable").reset_index(drop=True)


def comparison_table(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """One line per (model, recipe, imbalance), best mean test balanced accuracy first.

    Columns: the group keys, ``n_runs``, ``n_seeds`` (distinct seeds), ``seeds`` (sorted list),
    then for every metric of :func:`summary_metrics` present: ``<metric>_mean`` and
    ``<metric>_std`` (sample std, ddof=1; NaN for a single run), and for accuracy and balanced
    accuracy ``<metric>_low_mean`` / ``<metric>_high_mean``, the mean of the per-run bootstrap
    bounds (a rough summary, not an interval for the mean over seeds).
    """
    df = _frame(rows)
    if df.empty:
        return pd.DataFrame(columns=[*GROUP_KEYS, "n_runs", "n_seeds", "seeds", "seed_counts", "duplicate_seeds"])
    metrics = [m for m in summary_metrics() if m in df.columns]
    bounds = [c for c in _ci_columns() if c in df.columns]

    records = []
    for key, group in df.groupby(list(GROUP_KEYS), sort=False, dropna=False):
        record: dict[str, Any] = dict(zip(GROUP_KEYS, key, strict=True))
        seeds = [s for s in group["seed"] if s is not None] if "seed" in group.columns else []
        record["n_runs"] = len(group)
        record["n_seeds"] = len(set(seeds))
        record["seeds"] = sorted(set(seeds), key=_seed_order)
        record["seed_counts"] = {seed: seeds.count(seed) for seed in record["seeds"]}
        record["duplicate_seeds"] = len(seeds) > len(set(seeds))
        for m in metrics:
            values = group[m].dropna()
            record[f"{m}_mean"] = float(values.mean()) if len(values) else np.nan
            record[f"{m}_std"] = float(values.std(ddof=1)) if len(values) > 1 else np.nan
        for b in bounds:
            values = group[b].dropna()
            record[f"{b}_mean"] = float(values.mean()) if len(values) else np.nan
        records.append(record)

    table = pd.DataFrame(records)
    sort_col = "test_balanced_accuracy_mean"
    if sort_col in table.columns:
        table = table.sort_values(sort_col, ascending=False, na_position="last", kind="stable")
    return table.reset_index(drop=True)


def _column(table: pd.DataFrame, *candidates: str) -> np.ndarray | None:
    for name in candidates:
        if name in table.columns:
            return pd.to_numeric(table[name], errors="coerce").to_numpy(dtype=np.float64)
    return None


def plot_comparison(table: pd.DataFrame, title: str = "Test metrics per configuration") -> Figure:
    """Horizontal bars of balanced accuracy and accuracy per row, bootstrap CIs as error bars.

    Works on :func:`comparison_table` (uses the ``_mean`` columns and mean CI bounds) and on
    :func:`per_run_table` (uses the raw metric and its ``_low``/``_high``). Rows are drawn in
    table order from the top.
    """
    n = len(table)
    fig = new_figure(8.0, max(2.5, 0.55 * n + 1.5))
    ax = fig.add_subplot()
    if n == 0:
        ax.text(0.5, 0.5, "no runs", ha="center", va="center")
        ax.set_axis_off()
        return fig

    names = []
    for _, row in table.iterrows():
        name = " / ".join(str(row.get(k, _MISSING_KEY)) for k in GROUP_KEYS)
        if "n_seeds" in table.columns:
            name += f"  (n={int(row['n_runs'] if 'n_runs' in table.columns else row['n_seeds'])})"
        elif "seed" in table.columns and row.get("seed") is not None:
            name += f"  (seed {row['seed']})"
        names.append(name)

    y = np.arange(n)
    height = 0.38
    series = [
        ("test_balanced_accuracy", "balanced accuracy", "tab:blue", -height / 2),
        ("test_accuracy", "accuracy", "tab:orange", height / 2),
    ]
    for metric, label, colour, offset in series:
        values = _column(table, f"{metric}_mean", metric)
        if values is None:
            continue
        low = _column(table, f"{metric}_low_mean", f"{metric}_low")
        high = _column(table, f"{metric}_high_mean", f"{metric}_high")
        xerr = None
        if low is not None and high is not None:
            # Mean of lower bounds can't exceed the mean estimate, but clip in case of NaN mixes.
            xerr = np.vstack([np.clip(values - low, 0, None), np.clip(high - values, 0, None)])
            xerr = np.nan_to_num(xerr, nan=0.0)
        ax.barh(y + offset, np.nan_to_num(values), height=height, color=colour, label=label,
                xerr=xerr, capsize=3, error_kw={"elinewidth": 1})
        for yi, v in zip(y + offset, values, strict=True):
            if not np.isnan(v):
                ax.text(0.01, yi, f"{v:.3f}", va="center", fontsize=7, color="white")
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()  # best configuration (first row) on top
    ax.set_xlim(0, 1)
    ax.set_xlabel("test score (error bars: 95% patient-bootstrap CI)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def _cell(value: Any, floatfmt: str) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple, set, np.ndarray)):
        return ", ".join(_cell(v, floatfmt) for v in value)
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return ""
        return format(float(value), floatfmt)
    # Pipes would split the cell, newlines the row.
    return str(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(
    df: pd.DataFrame,
    columns: Sequence[str] | None = None,
    floatfmt: str = ".3f",
    index: bool = False,
) -> str:
    """A GitHub-flavoured markdown table of ``df``; numbers right-aligned, NaN left blank."""
    if columns is not None:
        df = df[list(columns)]
    if index:
        df = df.reset_index()
    headers = [str(c) for c in df.columns]
    numeric = [
        pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c]) for c in df.columns
    ]
    body = [[_cell(v, floatfmt) for v in row] for row in df.itertuples(index=False, name=None)]
    widths = [max([len(h), 3] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        padded = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric, strict=True)]
        return "| " + " | ".join(padded) + " |"

    rule = "| " + " | ".join(
        ("-" * (w - 1) + ":") if num else "-" * w for w, num in zip(widths, numeric, strict=True)
    ) + " |"
    return "\n".join([line(headers), rule] + [line(r) for r in body])


#: Test subsets that show how much a score leans on the metadata (see ``evaluation.report``).
METADATA_SUBSETS: tuple[tuple[str, str], ...] = (
    ("complete_metadata", "complete questionnaire"),
    ("incomplete_metadata", "incomplete questionnaire"),
    ("masked_metadata", "metadata masked (imputed)"),
    ("permuted_metadata", "metadata permuted"),
    ("permuted_metadata_complete", "permuted, complete rows"),
)


def _mean_std(record: Mapping[str, Any], metric: str, n_seeds: int) -> str:
    mean, std = _cell(record.get(f"{metric}_mean"), ".3f"), _cell(record.get(f"{metric}_std"), ".3f")
    return f"{mean} ± {std}" if mean and std and n_seeds > 1 else mean


def seeds_cell(record: Mapping[str, Any]) -> str:
    """The seeds of a configuration; a seed run more than once is flagged ("42 (x2)")."""
    counts = record.get("seed_counts") or {}
    seeds = record.get("seeds") or []
    return ", ".join(f"{s} (x{counts[s]})" if counts.get(s, 1) > 1 else str(s) for s in seeds)


def results_markdown(table: pd.DataFrame, labels: Sequence[str] = LABELS) -> str:
    """The README's results table: one line per configuration of :func:`comparison_table`.

    Metrics are "mean ± std over seeds" (just the value for one seed), accuracies followed by
    the mean bootstrap interval bounds, and the per-class recalls as one "a / b / ..." cell.
    """
    head = ("| model | recipe | imbalance | config | split | runs | seeds | test accuracy [95% CI] "
            "| test balanced acc. [95% CI] | complete questionnaire: bal. acc. / macro AUC / MEL recall "
            f"| macro AUC | val bal. acc. | recall {' / '.join(labels)} |")
    lines = [head, "| --- | --- | --- | --- | --- | ---: | --- | --- | --- | --- | ---: | ---: | --- |"]
    for record in table.to_dict("records"):
        n = int(record.get("n_runs") or 0)
        cells = [str(record[k]) for k in GROUP_KEYS] + [str(n), seeds_cell(record)]
        for metric in _CI_METRICS:
            text = _mean_std(record, metric, n)
            low, high = (_cell(record.get(f"{metric}_{bound}_mean"), ".3f") for bound in ("low", "high"))
            cells.append(f"{text} [{low}, {high}]" if text and low and high else text)
        complete = [_mean_std(record, "test_complete_metadata_balanced_accuracy", n),
                    _cell(record.get("test_complete_metadata_auc_macro_mean"), ".3f"),
                    _cell(record.get("test_complete_metadata_recall_MEL_mean"), ".2f")]
        cells.append(" / ".join(c or "-" for c in complete))
        cells += [_mean_std(record, "test_auc_macro", 1), _mean_std(record, "best_val_bacc", n)]
        cells.append(" / ".join(_cell(record.get(f"test_recall_{label}_mean"), ".2f") or "-" for label in labels))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def metadata_markdown(rows: Iterable[Mapping[str, Any]]) -> str:
    """Per run: test balanced accuracy on all rows and on each of :data:`METADATA_SUBSETS`."""
    rows = [dict(r) for r in rows]
    df = per_run_table(rows)  # sorted by configuration, then seed
    by_id = {r.get("run_id"): r for r in rows}  # per_run_table keeps only the summary columns
    head = ("| run | model | recipe | imbalance | config | split | seed | all rows | "
            + " | ".join(t for _, t in METADATA_SUBSETS) + " |")
    lines = [head, "| --- | --- | --- | --- | --- | --- | ---: | ---: | "
             + " | ".join("---:" for _ in METADATA_SUBSETS) + " |"]
    for record in df.to_dict("records"):
        source = by_id[record["run_id"]]
        cells = [str(record["run_id"])[:8], *(str(record[k]) for k in GROUP_KEYS), _cell(record.get("seed"), ".3f"),
                 _cell(record.get("test_balanced_accuracy"), ".3f")]
        for subset, _title in METADATA_SUBSETS:
            text = _cell(source.get(f"test_{subset}_balanced_accuracy"), ".3f")
            count = _cell(source.get(f"test_{subset}_n"), ".0f")
            # Masking keeps every row, so its count is the run's own.
            cells.append(f"{text} (n={count})" if text and count and subset in ("complete_metadata",
                                                                                 "incomplete_metadata") else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
