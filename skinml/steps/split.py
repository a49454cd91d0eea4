"""Pipeline steps that tie the library to MLflow runs: split now, train/evaluate/register later.

Each step records what it produced on its run; later steps find it again by run id, so train,
evaluate and register all see the same split.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from skinml import tracking
from skinml.constants import canonical_split_strategy
from skinml.data import schema
from skinml.data.source import load_metadata
from skinml.data.split import (
    attach_split,
    manifest_hash,
    patient_level_split,
    read_manifest,
    split_summary,
    write_manifest,
)

log = logging.getLogger(__name__)

MANIFEST_ARTIFACT = "split/manifest.csv"
SUMMARY_ARTIFACT = "split/summary.csv"


@dataclass
class SplitRef:
    """A split as later steps consume it."""

    manifest: pd.DataFrame
    sha256: str
    run_id: str | None
    source: str
    #: The split left out rows whose photo was missing: later steps load the data the same way.
    drop_missing_images: bool = False


def log_dataset_inputs(manifest: pd.DataFrame, data_dir: str, split_names=("train", "val", "test")) -> None:
    """Log each split of the manifest as an MLflow dataset input (context = split name)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "source type registered twice": harmless (README, "Facts the code relies on")
        for name in split_names:
            part = manifest[manifest["split"] == name].reset_index(drop=True)
            dataset = mlflow.data.from_pandas(
                part, source=str(data_dir), targets=schema.TARGET, name=f"pad-ufes-20-{name}"
            )
            tracking.log_input(dataset, context=name)


def split_params(data_dir: str, seed: int, strategy: str, val_fraction: float, test_fraction: float,
                 drop_missing_images: bool) -> dict[str, Any]:
    """The inputs that decide a split, as logged: what reuse compares."""
    return {"data_dir": data_dir, "seed": seed, "strategy": strategy, "val_fraction": val_fraction,
            "test_fraction": test_fraction, "drop_missing_images": drop_missing_images}


def run_split(
    data_dir: str | None = None,
    seed: int = 42,
    strategy: str = "stratified",
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    drop_missing_images: bool = False,
    experiment: str | None = None,
) -> SplitRef:
    """Make a patient-level split, log manifest and summary to a new run, and return it."""
    strategy = canonical_split_strategy(strategy)
    frame = load_metadata(data_dir, drop_missing_images=drop_missing_images)
    manifest = patient_level_split(frame, val_fraction, test_fraction, seed=seed, strategy=strategy)
    digest = manifest_hash(manifest)
    summary = split_summary(manifest)
    with tracking.start_run("split", experiment=experiment, run_name=f"split-{strategy}-{seed}",
                            tags={tracking.TAG_SPLIT_HASH: digest}) as run:
        tracking.log_params(split_params(frame.attrs["data_dir"], seed, strategy, val_fraction, test_fraction,
                                         drop_missing_images))
        mlflow.log_metrics(
            {
                "n_images": len(manifest),
                "n_patients": manifest["patient_id"].nunique(),
                "dropped_missing_images": frame.attrs["dropped_missing_images"],
                **{f"n_{s}": int((manifest["split"] == s).sum()) for s in ("train", "val", "test")},
            }
        )
        with tempfile.TemporaryDirectory() as tmp:
            write_manifest(manifest, Path(tmp, "manifest.csv"))
            summary.to_csv(Path(tmp, "summary.csv"))
            mlflow.log_artifacts(tmp, artifact_path="split")
        log_dataset_inputs(manifest, frame.attrs["data_dir"])
        run_id = run.info.run_id
    print(f"split run {run_id}: manifest sha256 {digest[:12]}\n{summary.to_string()}")
    return SplitRef(manifest=manifest, sha256=digest, run_id=run_id, source=f"runs:/{run_id}/{MANIFEST_ARTIFACT}",
                    drop_missing_images=drop_missing_images)


def load_split(split: str) -> SplitRef:
    """A split by MLflow run id (of a split run, or any run tagged with one) or manifest path."""
    if os.path.isfile(split):
        manifest = read_manifest(split)
        return SplitRef(manifest, manifest_hash(manifest), None, str(Path(split).resolve()))
    tracking.setup_tracking()
    client = mlflow.tracking.MlflowClient()
    try:
        run = client.get_run(split)
    except mlflow.exceptions.MlflowException as exc:
        raise ValueError(f"split {split!r} is neither a manifest file nor a run id in {mlflow.get_tracking_uri()}") from exc
    split_run = run.data.tags.get(tracking.TAG_SPLIT_RUN, split) if run.data.tags.get(tracking.TAG_STEP) != "split" else split
    path = tracking.download_artifact(split_run, MANIFEST_ARTIFACT)
    manifest = read_manifest(path)
    digest = manifest_hash(manifest)
    split_run_data = client.get_run(split_run)
    recorded = split_run_data.data.tags.get(tracking.TAG_SPLIT_HASH)
    if recorded and recorded != digest:
        raise ValueError(f"manifest of run {split_run} does not match its recorded hash: the artifact changed")
    dropped = tracking.run_param(split_run_data, "drop_missing_images", "False") == "True"
    return SplitRef(manifest, digest, split_run, f"runs:/{split_run}/{MANIFEST_ARTIFACT}", dropped)


def run_frame(run: mlflow.entities.Run, data_dir: str | None = None) -> pd.DataFrame:
    """Every row of the split a training run was trained on, with its ``split`` column; the
    manifest must still hash to what the run recorded."""
    split_ref = load_split(run.data.tags.get(tracking.TAG_SPLIT_RUN) or tracking.run_param(run, "split_source"))
    if split_ref.sha256 != run.data.tags.get(tracking.TAG_SPLIT_HASH):
        raise ValueError(f"the split found for run {run.info.run_id} does not match the hash it was trained with")
    data_dir = data_dir or tracking.run_param(run, "data_dir")
    return attach_split(load_metadata(data_dir, drop_missing_images=split_ref.drop_missing_images), split_ref.manifest)
