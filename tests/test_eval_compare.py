"""``skinml eval-compare``: two configurations' evaluations of one split, paired row by row."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from skinml.cli import cli
from skinml.data.schema import LABELS
from skinml.evaluation.bootstrap import replicated_bootstrap_diff
from skinml.steps.compare import compare_evaluations


def _truth(n_patients: int = 40) -> pd.DataFrame:
    """Two photos per patient; the first 24 patients answered the whole questionnaire."""
    patients = np.repeat(np.arange(n_patients), 2)
    return pd.DataFrame({
        "img_id": [f"PAT_{p}_{i}.png" for i, p in enumerate(patients)],
        "patient_id": [f"PAT_{p}" for p in patients],
        "true": [LABELS[i % len(LABELS)] for i in range(len(patients))],
        "complete_metadata": patients < 24,
    })


def _evaluated(truth: pd.DataFrame, wrong_patients: tuple[int, ...], split: str = "test", shuffle: int = 0) -> str:
    """A run whose `evaluate` predictions of ``split`` are right except on these patients."""
    frame = truth.copy()
    wrong = frame["patient_id"].isin([f"PAT_{p}" for p in wrong_patients])
    shifted = [LABELS[(LABELS.index(y) + 1) % len(LABELS)] for y in frame["true"]]
    frame["predicted"] = np.where(wrong, shifted, frame["true"])
    if shuffle:  # the CSV's row order is the run's own: pairing must go by image, not by position
        frame = frame.sample(frac=1, random_state=shuffle)
    with mlflow.start_run() as run:
        mlflow.log_text(frame.to_csv(index=False), f"evaluation/{split}/predictions.csv")
    return run.info.run_id


def test_eval_compare_pairs_runs_by_image_on_all_and_complete_rows(mlflow_store):
    truth = _truth()
    a1, a2 = _evaluated(truth, (3,), shuffle=1), _evaluated(truth, (30,), shuffle=2)
    b1, b2 = _evaluated(truth, (3, 5)), _evaluated(truth, (3, 30, 31), shuffle=3)
    result = compare_evaluations(f"{a1},{a2}", [b1, b2], n_boot=400, seed=1)
    assert result.runs_a == (a1, a2) and result.runs_b == (b1, b2)
    assert result.n_rows == {"all": 80, "complete": 48}
    # the same figures as the bootstrap of the aligned rows themselves (truth in image order)
    rows = truth.sort_values("img_id").reset_index(drop=True)
    def preds(wrong):  # noqa: E306
        bad = rows["patient_id"].isin([f"PAT_{p}" for p in wrong])
        return np.where(bad, [LABELS[(LABELS.index(y) + 1) % len(LABELS)] for y in rows["true"]], rows["true"])
    for subset, mask in (("all", slice(None)), ("complete", rows["complete_metadata"].to_numpy())):
        expected = replicated_bootstrap_diff(rows["true"][mask], [preds((3,))[mask], preds((30,))[mask]],
                                             [preds((3, 5))[mask], preds((3, 30, 31))[mask]], rows["patient_id"][mask],
                                             metrics=("balanced_accuracy", "recall_MEL"), n_boot=400, seed=1)
        assert result.paired[subset] == expected
    # by hand: on all rows a misses 2 photos per run, b 4 and 6; a is never behind on a resample
    accuracy_like = result.paired["all"]["balanced_accuracy"]
    assert accuracy_like["estimate"] > 0 and accuracy_like["low"] >= 0
    # on complete rows (patients 0-23) a misses patient 3 in one run of two, b in both, and 5 once
    complete = result.paired["complete"]["balanced_accuracy"]
    assert complete["estimate"] > 0 and complete["low"] >= 0 and complete["p_a_better"] < 1

    out = CliRunner().invoke(cli, ["eval-compare", f"{a1},{a2}", f"{b1},{b2}", "--n-boot", "400", "--seed", "1"])
    assert out.exit_code == 0, out.output
    assert f"a = 2 run(s): {a1[:8]}, {a2[:8]}" in out.output
    line = next(x for x in out.output.splitlines() if x.split()[:2] == ["complete", "48"])
    assert f"{complete['estimate']:+.3f}" in line and f"[{complete['low']:+.3f}, {complete['high']:+.3f}]" in line


def test_eval_compare_refuses_runs_it_cannot_pair(mlflow_store):
    truth = _truth()
    a, b = _evaluated(truth, (1,)), _evaluated(truth, (2,))
    other = _evaluated(truth.iloc[:-2], (2,))  # a patient fewer: another split
    with pytest.raises(ValueError, match=rf"runs {a} and {other} predicted different test rows \(e.g. image "
                                         r"'PAT_39_7[89].png'\): its patient or label differs: not the same split"):
        compare_evaluations(a, other)
    with pytest.raises(ValueError, match=rf"run {a} has no evaluation of its val split .*`skinml evaluate --run-id "
                                         rf"{a} --split val` first"):
        compare_evaluations(a, b, split="val")
    with pytest.raises(ValueError, match="side a names a run twice"):
        compare_evaluations(f"{a},{a}", b)
    out = CliRunner().invoke(cli, ["eval-compare", a, "nope"])
    assert out.exit_code == 1 and "no run 'nope' in the tracking store" in out.output
