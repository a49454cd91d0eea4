"""The tracked evaluation step: score a training run's selected checkpoint on its own split.

Besides the usual metrics it measures how much the score leans on metadata (README, "Facts the code relies on"): the
same metrics on rows with a complete questionnaire and on rows without, and the whole split
scored again without usable metadata, two ways: **masked** (every clinical field set to missing,
then imputed with the training means/modes: exactly the encoding of the missing-questionnaire
rows, which are all benign in PAD-UFES-20, so it measures fusion under a benign prior) and
**permuted** (the clinical fields of each row replaced by those of another row of the same split,
one seeded permutation: real answers that carry no information about this photo).
Results go to the training run (stepless ``test_*`` metrics, ``evaluation/<split>/`` files)
and, under ``mlflow run``, to the evaluate run too. Another view of the photo or test-time flips
(``view``, ``tta``) are logged as a variant: ``<prefix><variant>_*`` metrics and
``evaluation/<split>-<variant>/`` files, so the run's own figures stay as they were.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import Metric

from skinml import inference, tracking
from skinml.data import schema
from skinml.data.dataset import complete_questionnaire, mask_metadata
from skinml.evaluation.bootstrap import bootstrap_ci, flatten_ci
from skinml.evaluation.metrics import compute_metrics, flatten_metrics, format_report, to_jsonable
from skinml.evaluation.plots import plot_confusion_matrix, plot_reliability, plot_roc_curves, save_figure
from skinml.inference import decode_images, pick_device, score_frame

SPLIT_PREFIX = {"test": "test_", "val": "evalval_"}


@dataclass
class EvaluationResult:
    metrics: dict[str, float]
    report: str
    predictions: pd.DataFrame


SUBSET_LABELS = {
    "complete_metadata": "complete questionnaire",
    "incomplete_metadata": "incomplete questionnaire",
    "masked_metadata": "metadata masked (imputed: the benign prior)",
    "permuted_metadata": "metadata permuted across rows (neutral)",
    "masked_metadata_complete": "  masked, complete-questionnaire rows",
    "permuted_metadata_complete": "  permuted, complete-questionnaire rows",
}

#: Seed of the permutation arm's row shuffle.
PERMUTATION_SEED = 0


def permute_metadata(frame: pd.DataFrame, seed: int = PERMUTATION_SEED) -> pd.DataFrame:
    """Each row's clinical fields taken from another row of ``frame`` (one permutation of the
    rows, all fields together; identifiers, label and photo kept)."""
    order = np.random.default_rng(seed).permutation(len(frame))
    permuted = frame.copy()
    columns = [c for c in schema.FEATURES if c in frame.columns]
    permuted[columns] = frame[columns].iloc[order].set_axis(frame.index)  # dtypes kept
    return permuted


def variant_name(view: str | None, tta: str) -> str:
    """'' for the checkpoint as trained, else e.g. 'crop', 'flips', 'squash_flips'."""
    return "_".join(part for part in (view or "", "" if tta == "none" else tta) if part)


def _subset_metrics(y: np.ndarray, proba: np.ndarray, mask: np.ndarray) -> dict[str, Any] | None:
    if mask.sum() == 0:
        return None
    return compute_metrics(y[mask], proba[mask])


def evaluate_run(run_id: str, split: str = "test", data_dir: str | None = None, n_boot: int = 1000,
                 device: str = "cpu", batch_size: int = 64, explanations: bool = True,
                 view: str | None = None, tta: str = "none") -> EvaluationResult:
    """Score ``run_id``'s selected checkpoint on its own split and log everything to the run.

    With ``explanations`` an explanation gallery (per class, the most confident right and wrong
    cases with heatmaps and metadata contributions) goes to ``evaluation/<split>/explanations/``.
    ``view`` ("squash"/"crop") scores the photos another way than the checkpoint's own view;
    ``tta="flips"`` averages the probabilities over the four flips.
    """
    from skinml.constants import EVAL_VIEWS

    if split not in SPLIT_PREFIX:
        raise ValueError(f"split must be one of {sorted(SPLIT_PREFIX)}, got {split!r}")
    if view is not None and view not in EVAL_VIEWS:
        raise ValueError(f"view must be one of {EVAL_VIEWS}, got {view!r}")
    if tta not in inference.TTA_CHOICES:
        raise ValueError(f"tta must be one of {inference.TTA_CHOICES}, got {tta!r}")
    tracking.setup_tracking()
    client = mlflow.MlflowClient()
    run = tracking.get_run(run_id)
    if run.data.tags.get(tracking.TAG_STEP) != "train":
        raise ValueError(f"run {run_id} is not a skinml training run (tag {tracking.TAG_STEP}={run.data.tags.get(tracking.TAG_STEP)!r})")
    start = time.perf_counter()
    state = inference.load_checkpoint(tracking.download_artifact(run_id, inference.BEST))
    bundle = inference.build_inference_bundle(state, tta=None if tta == "none" else tta)
    if view is not None and bundle.image_config is not None:
        from dataclasses import replace

        train_resize = int(float(tracking.run_param(run, "augment.resize") or 0)) or bundle.image_config.image_size
        bundle = replace(bundle, image_config=replace(bundle.image_config,
                                                      resize=train_resize if view == "crop" else 0))
    variant = variant_name(view, tta)

    from skinml.steps.split import run_frame

    frame = run_frame(run, data_dir)
    frame = frame[frame["split"] == split].reset_index(drop=True)
    y = frame[schema.TARGET].map(schema.LABEL_TO_INDEX).to_numpy()

    dev = pick_device(device)
    images = decode_images(bundle, frame)
    proba = score_frame(bundle, frame, dev, batch_size, images)
    masked_proba = score_frame(bundle, mask_metadata(frame), dev, batch_size, images)
    permuted_proba = score_frame(bundle, permute_metadata(frame), dev, batch_size, images)
    complete = complete_questionnaire(frame)

    prefix = SPLIT_PREFIX[split] + (f"{variant}_" if variant else "")
    full = compute_metrics(y, proba)
    ci = bootstrap_ci(y, proba.argmax(1), frame[schema.PATIENT_ID].to_numpy(), n_boot=n_boot, seed=0) if n_boot else {}
    subsets = {
        "complete_metadata": _subset_metrics(y, proba, complete),
        "incomplete_metadata": _subset_metrics(y, proba, ~complete),
        "masked_metadata": compute_metrics(y, masked_proba),
        "permuted_metadata": compute_metrics(y, permuted_proba),
        "masked_metadata_complete": _subset_metrics(y, masked_proba, complete),
        "permuted_metadata_complete": _subset_metrics(y, permuted_proba, complete),
    }
    flat = {**flatten_metrics(full, prefix=prefix), **flatten_ci(ci, prefix=prefix)}
    for name, metrics in subsets.items():
        if metrics is not None:
            sub = flatten_metrics(metrics, prefix=f"{prefix}{name}_")
            flat.update({k: v for k, v in sub.items() if k.split(f"{name}_", 1)[1] in
                         ("n", "accuracy", "balanced_accuracy", "auc_macro", "recall_MEL")})
    if split == "test" and not variant:
        for metric, summary in (("accuracy", "best_val_accuracy"), ("balanced_accuracy", "best_val_bacc")):
            if summary in run.data.metrics:
                flat[f"val_test_gap_{metric}"] = run.data.metrics[summary] - full[metric]
    flat[f"{prefix}eval_seconds"] = time.perf_counter() - start

    predictions = frame[[schema.IMAGE_ID, schema.PATIENT_ID, schema.TARGET]].rename(columns={schema.TARGET: "true"})
    predictions["predicted"] = [schema.LABELS[i] for i in proba.argmax(1)]
    predictions["predicted_masked_metadata"] = [schema.LABELS[i] for i in masked_proba.argmax(1)]
    predictions["predicted_permuted_metadata"] = [schema.LABELS[i] for i in permuted_proba.argmax(1)]
    predictions["complete_metadata"] = complete
    for i, label in enumerate(schema.LABELS):
        predictions[f"p_{label}"] = proba[:, i]

    report = _format(full, ci, subsets, flat, prefix, run, split + (f" ({variant})" if variant else ""))
    gallery = None
    if explanations:
        def gallery(out_dir: Path) -> None:
            from skinml.explain import write_gallery

            write_gallery(bundle, frame, images, proba, out_dir)

    _log(client, run_id, split + (f"-{variant}" if variant else ""), flat, full, ci, subsets, predictions, report,
         proba, y, gallery)
    print(report)
    return EvaluationResult(flat, report, predictions)


def _format(full, ci, subsets, flat, prefix, run, split) -> str:
    title = (f"{run.data.tags.get(tracking.TAG_MODEL, '?')} / recipe {run.data.tags.get(tracking.TAG_RECIPE, '?')} "
             f"- run {run.info.run_id[:8]} - {split} split")
    lines = [format_report(full, title=title, ci=ci), "", "How much the score leans on metadata:"]
    lines.append(f"  {'subset':<44}{'n':>5}{'accuracy':>10}{'bal. acc':>10}{'MEL rec.':>10}")
    rows = [("all rows", full), *((SUBSET_LABELS.get(name, name), m) for name, m in subsets.items())]
    for name, m in rows:
        if m is None:
            lines.append(f"  {name:<44}{0:>5}   (no rows)")
            continue
        mel = m["melanoma"]["recall"] if m.get("melanoma") else float("nan")
        lines.append(f"  {name:<44}{m['n']:>5}{m['accuracy']:>10.3f}{m['balanced_accuracy']:>10.3f}{mel:>10.3f}")
    for metric in ("accuracy", "balanced_accuracy"):
        if f"val_test_gap_{metric}" in flat:
            lines.append(f"  validation - test gap, {metric}: {flat[f'val_test_gap_{metric}']:+.3f}")
    return "\n".join(lines)


def _log(client, run_id, split, flat, full, ci, subsets, predictions, report, proba, y, gallery=None) -> None:
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, 0) for k, v in flat.items() if np.isfinite(v)]
    targets = [run_id]
    outer = os.environ.get("MLFLOW_RUN_ID")
    if outer and outer != run_id and client.get_run(outer).data.tags.get(tracking.TAG_STEP) in (None, "evaluate"):
        # the evaluate run that `mlflow run -e evaluate` started
        targets.append(outer)
        client.set_tag(outer, tracking.TAG_TRAIN_RUN, run_id)
        client.set_tag(outer, tracking.TAG_STEP, "evaluate")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "metrics.json").write_text(json.dumps(to_jsonable(
            {"overall": full, "bootstrap_ci": ci, "subsets": subsets, "flat": flat}), indent=2))
        for kind, normalized in (("counts", False), ("normalized", True)):
            cm = full["confusion_matrix_normalized" if normalized else "confusion_matrix"]
            (out / f"confusion_matrix_{kind}.json").write_text(json.dumps({"labels": list(schema.LABELS), "matrix": cm}))
            save_figure(plot_confusion_matrix(full["confusion_matrix"], list(schema.LABELS), normalized=normalized,
                                              title=f"{split} confusion matrix ({kind})"),
                        out / f"confusion_matrix_{kind}.png")
        save_figure(plot_roc_curves(y, proba, list(schema.LABELS)), out / "roc_curves.png")
        save_figure(plot_reliability(full), out / "reliability.png")
        predictions.to_csv(out / "predictions.csv", index=False)
        (out / "report.txt").write_text(report + "\n")
        if gallery is not None:
            gallery(out / "explanations")
        for target in targets:
            for start in range(0, len(metrics), 500):
                client.log_batch(target, metrics=metrics[start:start + 500])
            client.log_artifacts(target, str(out), f"evaluation/{split}")
