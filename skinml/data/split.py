"""Patient-level train/validation/test split, written as a manifest that later steps consume.

No patient ever appears in two splits: PAD-UFES-20 has up to 10 images per patient and
image-level splits inflate scores by several points (README, "Facts the code relies on").
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from skinml.constants import SPLIT_STRATEGIES as STRATEGIES
from skinml.constants import canonical_split_strategy
from skinml.data import schema

SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ("img_id", "patient_id", "lesion_id", "diagnostic", "split")


def _patient_stratum(frame: pd.DataFrame) -> pd.Series:
    """One label per patient: the rarest diagnosis among their images.

    Using the rarest class spreads the few MEL (and SCC) patients over all splits instead of
    letting a patient's more common second diagnosis decide where they go.
    """
    frequency = frame[schema.TARGET].value_counts()
    rank = {label: (frequency[label], label) for label in frequency.index}
    return frame.groupby(schema.PATIENT_ID)[schema.TARGET].agg(lambda s: min(s, key=rank.__getitem__))


def _stratified_assignment(frame: pd.DataFrame, fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Greedy per-stratum allocation of patients, balancing image counts per split."""
    return _greedy_assignment(frame, fractions, seed, SPLITS)


def _greedy_assignment(frame: pd.DataFrame, fractions: dict, seed: int, names: tuple) -> dict:
    """Per stratum (the patient's rarest diagnosis), shuffled patients, largest first, each to
    the bucket furthest below its share of the stratum's images (ties: the earlier bucket)."""
    SPLITS = names  # noqa: N806 (the buckets: splits, or folds)
    rng = np.random.default_rng(seed)
    images = frame.groupby(schema.PATIENT_ID).size()
    stratum = _patient_stratum(frame)
    assignment: dict[str, str] = {}
    for label in sorted(stratum.unique()):
        patients = np.array(sorted(stratum.index[stratum == label]))
        rng.shuffle(patients)
        # Largest patients first (stable after the shuffle), so small ones fill the gaps.
        order = sorted(range(len(patients)), key=lambda i: -images[patients[i]])
        total = images[patients].sum()
        filled = dict.fromkeys(SPLITS, 0)
        for i in order:
            patient = patients[i]
            deficit = {s: fractions[s] * total - filled[s] for s in SPLITS}
            target = max(SPLITS, key=lambda s: (deficit[s], -SPLITS.index(s)))
            assignment[patient] = target
            filled[target] += int(images[patient])
    return assignment


def _random_assignment(frame: pd.DataFrame, fractions: dict[str, float], seed: int) -> dict[str, str]:
    """The original status report's split: plain ``train_test_split`` over patient ids."""
    patients = sorted(frame[schema.PATIENT_ID].unique())
    held_out = fractions["val"] + fractions["test"]
    train, rest = train_test_split(patients, test_size=held_out, random_state=seed)
    val, test = train_test_split(rest, test_size=fractions["test"] / held_out, random_state=seed)
    return {**dict.fromkeys(train, "train"), **dict.fromkeys(val, "val"), **dict.fromkeys(test, "test")}


def patient_level_split(
    frame: pd.DataFrame,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 42,
    strategy: str = "stratified",
) -> pd.DataFrame:
    """Return the manifest: one row per image with its split, sorted by ``img_id``."""
    strategy = canonical_split_strategy(strategy)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown split strategy {strategy!r}; choose one of {STRATEGIES}")
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"bad split fractions val={val_fraction}, test={test_fraction}")
    fractions = {"train": 1 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}
    assign = _stratified_assignment if strategy == "stratified" else _random_assignment
    assignment = assign(frame, fractions, seed)
    manifest = frame[list(MANIFEST_COLUMNS[:-1])].copy()
    manifest["split"] = frame[schema.PATIENT_ID].map(assignment)
    return manifest.sort_values(schema.IMAGE_ID, kind="stable").reset_index(drop=True)


def patient_folds(frame: pd.DataFrame, k: int, seed: int = 42) -> pd.Series:
    """Fold (0 .. k-1) of every row: patients never straddle folds, and each fold gets about
    1/k of every stratum's images, as :func:`patient_level_split` balances its splits."""
    if not 2 <= k <= frame[schema.PATIENT_ID].nunique():
        raise ValueError(f"k must be from 2 to the number of patients ({frame[schema.PATIENT_ID].nunique()}), got {k}")
    folds = tuple(range(k))
    assignment = _greedy_assignment(frame, dict.fromkeys(folds, 1.0 / k), seed, folds)
    return frame[schema.PATIENT_ID].map(assignment).astype(int)


def fold_manifest(manifest: pd.DataFrame, folds: pd.Series, fold: int) -> pd.DataFrame:
    """``manifest`` with its train and val rows re-split: ``fold`` becomes val, the other folds
    train; test rows stay test (cross-validation never looks at them)."""
    out = manifest.copy()
    pool = out["split"].isin(("train", "val"))
    if not folds.index.equals(out.index[pool]):
        raise ValueError("folds must be indexed like the manifest's train and val rows")
    out.loc[pool, "split"] = np.where(folds == fold, "val", "train")
    return out


def manifest_bytes(manifest: pd.DataFrame) -> bytes:
    buffer = io.StringIO()
    manifest[list(MANIFEST_COLUMNS)].to_csv(buffer, index=False, lineterminator="\n")
    return buffer.getvalue().encode()


def manifest_hash(manifest: pd.DataFrame) -> str:
    return hashlib.sha256(manifest_bytes(manifest)).hexdigest()


def write_manifest(manifest: pd.DataFrame, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.write_bytes(manifest_bytes(manifest))
    return path


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    manifest = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        raise ValueError(f"split manifest '{path}' lacks column(s) {missing}")
    bad = sorted(set(manifest["split"]) - set(SPLITS))
    if bad:
        raise ValueError(f"split manifest '{path}' has unknown split name(s) {bad}")
    return manifest


def split_summary(manifest: pd.DataFrame) -> pd.DataFrame:
    """Images per class and split, plus patients and each split's share of images."""
    counts = pd.crosstab(manifest["diagnostic"], manifest["split"]).reindex(
        index=list(schema.LABELS), columns=list(SPLITS), fill_value=0
    )
    counts.loc["total"] = counts.sum()
    counts.loc["patients"] = [manifest.loc[manifest["split"] == s, "patient_id"].nunique() for s in SPLITS]
    counts["all"] = counts.sum(axis=1)
    counts.index.name = "diagnostic"
    return counts


def attach_split(frame: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """Add the manifest's ``split`` column to loaded metadata, checking they describe the same data."""
    split_of = dict(zip(manifest["img_id"], manifest["split"]))
    missing = [i for i in frame[schema.IMAGE_ID] if i not in split_of]
    if missing:
        raise ValueError(
            f"{len(missing)} image(s) of the dataset are not in the split manifest (first: {missing[:5]}); "
            "the split was made from a different copy of the data: make a new split."
        )
    labels = dict(zip(manifest["img_id"], manifest["diagnostic"]))
    changed = [i for i, d in zip(frame[schema.IMAGE_ID], frame[schema.TARGET]) if labels[i] != d]
    if changed:
        raise ValueError(f"diagnostic of {len(changed)} image(s) differs from the split manifest (first: {changed[:5]})")
    frame = frame.copy()
    frame["split"] = frame[schema.IMAGE_ID].map(split_of)
    return frame
