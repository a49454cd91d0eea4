"""Compare evaluated training runs from MLflow: the research question's table and figure."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import mlflow
import pandas as pd

from skinml import tracking
from skinml.evaluation.compare import (
    comparison_table,
    metadata_markdown,
    per_run_table,
    plot_comparison,
    results_markdown,
    to_markdown,
)
from skinml.evaluation.plots import save_figure


def recipe_config(run: mlflow.entities.Run) -> str:
    """A short hash of the run's resolved recipe (every ``recipe.*`` field but the preset name)."""
    fields = sorted((k, tracking.run_param(run, k)) for k in run.data.params
                    if k.startswith("recipe.") and k != "recipe.preset")
    fields = sorted({k.removeprefix("resolved."): v for k, v in fields}.items())
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:8] if fields else "-"


def model_label(run: mlflow.entities.Run) -> str:
    """The model column: an ensemble or test-time-augmented run is its own row, never pooled
    with the seeds it averages (``cnn_fusion ensemble x5 +flips``)."""
    from skinml.steps.ensemble import TAG_ENSEMBLE_OF, TAG_TTA

    tags = run.data.tags
    model = tags.get(tracking.TAG_MODEL, tracking.run_param(run, "model", "?"))
    members = [m for m in tags.get(TAG_ENSEMBLE_OF, "").split(",") if m]
    if len(members) > 1:
        model += f" ensemble x{len(members)}"
    if tags.get(TAG_TTA, "none") != "none":
        model += f" +{tags[TAG_TTA]}"
    if tags.get("skinml.view"):
        model += f" ({tags['skinml.view']} view)"
    return model


def run_row(run: mlflow.entities.Run) -> dict:
    """One evaluated training run as a comparison row (identifiers + test metrics)."""
    params, tags = run.data.params, run.data.tags
    return {
        "config": recipe_config(run),
        "split": tags.get(tracking.TAG_SPLIT_HASH, "")[:8] or "-",
        "run_id": run.info.run_id,
        "model": model_label(run),
        "recipe": tags.get(tracking.TAG_RECIPE, "?"),
        "imbalance": params.get("recipe.imbalance", "?"),
        "backbone": tracking.run_param(run, "backbone", ""),
        "seed": tracking.run_param(run, "seed"),
        "split_sha256": tags.get(tracking.TAG_SPLIT_HASH, "")[:12],
        **{k: v for k, v in run.data.metrics.items() if k.startswith(("test_", "best_val", "val_test_gap"))},
    }


def find_runs(run_ids: list[str] | None = None, experiments: list[str] | None = None,
              filter_string: str = "") -> list[mlflow.entities.Run]:
    """Named runs, or every finished, evaluated training run (optionally of some experiments)."""
    tracking.setup_tracking()
    client = mlflow.MlflowClient()
    if run_ids:
        return [client.get_run(r) for r in run_ids]
    if experiments:
        ids = []
        for name in experiments:
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise ValueError(f"no experiment named {name!r}")
            ids.append(experiment.experiment_id)
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    query = f"tags.`{tracking.TAG_STEP}` = 'train' and attributes.status = 'FINISHED'"
    if filter_string:
        query += f" and {filter_string}"
    runs = client.search_runs(ids, query, max_results=5000)
    return [r for r in runs if "test_balanced_accuracy" in r.data.metrics]


def compare_runs(run_ids: list[str] | None = None, experiments: list[str] | None = None, filter_string: str = "",
                 out: str | None = None, log: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write ``comparison.md``/``.csv``, ``runs.csv``, ``results.md`` and ``comparison.png``.

    ``results.md`` holds the README's two results tables (per configuration; per run with the
    metadata subsets). Returns the per-configuration and per-run tables.
    """
    runs = find_runs(run_ids, experiments, filter_string)
    if not runs:
        raise ValueError("no evaluated training runs matched: train and evaluate some first")
    rows = [run_row(r) for r in runs]
    hashes = {r["split_sha256"] for r in rows}
    if len(hashes) > 1:
        print(f"Warning: these runs used {len(hashes)} different splits; their test numbers are not comparable.")
    table, per_run = comparison_table(rows), per_run_table(rows)
    for record in table[table["duplicate_seeds"]].to_dict("records"):
        print(f"Warning: {record['model']} / {record['recipe']} (config {record['config']}) has repeated seeds "
              f"{[s for s, c in record['seed_counts'].items() if c > 1]}: reruns are averaged in; pass run ids to "
              "choose.")
    out_dir = Path(out) if out else Path(tempfile.mkdtemp(prefix="skinml-compare-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "comparison.csv", index=False)
    per_run.to_csv(out_dir / "runs.csv", index=False)
    (out_dir / "comparison.md").write_text(to_markdown(table) + "\n")
    (out_dir / "results.md").write_text(results_markdown(table) + "\n\n" + metadata_markdown(rows) + "\n")
    save_figure(plot_comparison(table), out_dir / "comparison.png")
    if log:
        with tracking.start_run("compare", run_name="compare") as run:
            mlflow.log_artifacts(str(out_dir), "comparison")
            mlflow.set_tag("skinml.compared_runs", ",".join(r["run_id"] for r in rows)[:5000])
            print(f"comparison logged to run {run.info.run_id}")
    print(results_markdown(table))
    print(f"wrote {out_dir}/results.md, comparison.md, comparison.csv, runs.csv, comparison.png")
    return table, per_run
