"""Compare evaluated training runs from MLflow: the research question's table and figure, and
paired differences of two configurations on one split (``skinml eval-compare``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from skinml import tracking
from skinml.data import schema
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


#: The row identity every paired evaluation must share: image, patient, label and questionnaire.
EVAL_ROW_KEYS = [schema.IMAGE_ID, schema.PATIENT_ID, "true", "complete_metadata"]


@dataclasses.dataclass(frozen=True)
class PairedEvaluation:
    """Two configurations' evaluations of one split, paired row by row (``compare_evaluations``)."""

    split: str
    runs_a: tuple[str, ...]
    runs_b: tuple[str, ...]
    n_rows: dict[str, int]  # {"all"|"complete": rows scored}
    paired: dict[str, dict[str, dict[str, float]]]  # {"all"|"complete": replicated_bootstrap_diff(...)}


def compare_evaluations(run_a: str | list[str], run_b: str | list[str], split: str = "test", n_boot: int = 2000,
                        seed: int = 0) -> PairedEvaluation:
    """Pair the ``skinml evaluate`` predictions of two configurations on the same split's rows.

    Each side is one training (or ensemble) run or several (a list, or ids joined by commas),
    e.g. the seeds of a recipe; its figure is the mean over its runs, and the interval is that
    of the difference of the two means, every run scored on the same resampled patients
    (:func:`skinml.evaluation.bootstrap.replicated_bootstrap_diff`), on all rows and on
    complete-questionnaire rows. All runs must have predicted the same rows (same split).
    """
    from skinml.evaluation.bootstrap import replicated_bootstrap_diff

    sides = [side_run_ids(ids, side, "run") for ids, side in ((run_a, "a"), (run_b, "b"))]
    everyone = sides[0] + sides[1]
    tracking.setup_tracking()
    frames = [_evaluation_predictions(run_id, split) for run_id in everyone]
    rows, predicted = aligned_predictions(frames, everyone, EVAL_ROW_KEYS, f"{split} rows",
                                          "its patient or label differs: not the same split")
    preds = predicted[:len(sides[0])], predicted[len(sides[0]):]
    paired, n_rows = {}, {}
    for subset, mask in (("all", np.ones(len(rows), dtype=bool)), ("complete", rows["complete_metadata"].to_numpy(bool))):
        n_rows[subset] = int(mask.sum())
        if mask.any():
            paired[subset] = replicated_bootstrap_diff(rows["true"][mask], [p[mask] for p in preds[0]],
                                                       [p[mask] for p in preds[1]], rows[schema.PATIENT_ID][mask],
                                                       metrics=("balanced_accuracy", "recall_MEL"), n_boot=n_boot,
                                                       seed=seed)
    return PairedEvaluation(split, tuple(sides[0]), tuple(sides[1]), n_rows, paired)


def format_paired_evaluation(result: PairedEvaluation) -> str:
    names = [f"{len(ids)} run(s): {', '.join(i[:8] for i in ids)}" for ids in (result.runs_a, result.runs_b)]
    lines = [f"{result.split} split", f"  a = {names[0]}", f"  b = {names[1]}",
             "(a side's figure is the mean over its runs; interval: paired patient bootstrap of a - b)", "",
             f"  {'rows':<10}{'n':>5}  {'metric':<19}{'a':>7}{'b':>7}{'a - b':>8}  {'95% interval':<18}{'a ahead':>8}"]
    for subset, metrics in result.paired.items():
        for metric, r in metrics.items():
            if np.isnan(r["estimate"]):
                continue
            lines.append(f"  {subset:<10}{result.n_rows[subset]:>5}  {metric:<19}{r['a']:>7.3f}{r['b']:>7.3f}"
                         f"{r['estimate']:>+8.3f}  [{r['low']:+.3f}, {r['high']:+.3f}]  {r['p_a_better']:>7.0%}")
    return "\n".join(lines)


def side_run_ids(ids: str | list[str], side: str, what: str) -> list[str]:
    """One side of a comparison: run ids from a list or a comma-joined string, none empty or repeated."""
    out = [i.strip() for i in (ids.split(",") if isinstance(ids, str) else ids)]
    if not out or not all(out):
        raise ValueError(f"side {side} of the comparison names no {what}: {ids!r}")
    if len(set(out)) < len(out):
        raise ValueError(f"side {side} names a {what} twice: {ids!r}")
    return out


def aligned_predictions(frames: list[pd.DataFrame], run_ids: list[str], keys: list[str], what: str,
                        hint: str) -> tuple[pd.DataFrame, list[np.ndarray]]:
    """The rows every run predicted (``keys``) and each run's predicted labels for them, in the
    same row order; refused, naming both runs and an image, if the runs predicted other rows."""
    first = frames[0][keys + ["predicted"]].sort_values(schema.IMAGE_ID, kind="stable").reset_index(drop=True)
    predicted = [first["predicted"].to_numpy()]
    for run_id, frame in zip(run_ids[1:], frames[1:]):
        both = first[keys].merge(frame[keys + ["predicted"]], on=keys, how="outer", indicator=True,
                                 validate="one_to_one")
        unmatched = both[both["_merge"] != "both"]
        if len(unmatched):
            raise ValueError(f"runs {run_ids[0]} and {run_id} predicted different {what} "
                             f"(e.g. image {unmatched[schema.IMAGE_ID].iloc[0]!r}): {hint}")
        predicted.append(both.set_index(schema.IMAGE_ID).loc[first[schema.IMAGE_ID], "predicted"].to_numpy())
    return first[keys], predicted


def _evaluation_predictions(run_id: str, split: str) -> pd.DataFrame:
    run = tracking.get_run(run_id)
    try:
        path = tracking.download_artifact(run.info.run_id, f"evaluation/{split}/predictions.csv")
    except (mlflow.exceptions.MlflowException, OSError) as exc:
        flag = "" if split == "test" else f" --split {split}"
        raise ValueError(f"run {run_id} has no evaluation of its {split} split (evaluation/{split}/predictions.csv): "
                         f"run `skinml evaluate --run-id {run_id}{flag}` first") from exc
    return pd.read_csv(path)
