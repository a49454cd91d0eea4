"""Tests of skinml.evaluation: metrics against hand-computed values, bootstrap, figures, tables."""

from __future__ import annotations

import json
import math
from fractions import Fraction as F

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from skinml.data.schema import LABELS
from skinml.evaluation import (
    bootstrap_ci,
    comparison_table,
    compute_metrics,
    flatten_ci,
    flatten_metrics,
    format_report,
    metadata_markdown,
    paired_bootstrap_diff,
    per_run_table,
    plot_comparison,
    plot_confusion_matrix,
    plot_reliability,
    plot_roc_curves,
    replicated_bootstrap_diff,
    results_markdown,
    save_figure,
    to_jsonable,
    to_markdown,
)

IDX = {label: i for i, label in enumerate(LABELS)}
C = len(LABELS)


def one_hot_proba(pred: list[int], top: float = 0.5) -> np.ndarray:
    """Rows with ``top`` on the predicted class and the rest spread evenly."""
    p = np.full((len(pred), C), (1 - top) / (C - 1))
    p[np.arange(len(pred)), pred] = top
    return p


# Hand example, 12 images (true -> predicted):
#   ACK->ACK, ACK->ACK, ACK->SEK, BCC->BCC, BCC->BCC, BCC->MEL,
#   MEL->MEL, MEL->NEV, MEL->BCC, NEV->NEV, SCC->BCC, SEK->SEK
# SCC is never predicted; every class has at least one true sample.
PAIRS = [
    ("ACK", "ACK"), ("ACK", "ACK"), ("ACK", "SEK"),
    ("BCC", "BCC"), ("BCC", "BCC"), ("BCC", "MEL"),
    ("MEL", "MEL"), ("MEL", "NEV"), ("MEL", "BCC"),
    ("NEV", "NEV"), ("SCC", "BCC"), ("SEK", "SEK"),
]  # fmt: skip
Y_TRUE = np.array([IDX[t] for t, _ in PAIRS])
Y_PRED = [IDX[p] for _, p in PAIRS]

# Confusion matrix (rows true, cols predicted; order ACK BCC MEL NEV SCC SEK), read off PAIRS.
CM = [
    [2, 0, 0, 0, 0, 1],
    [0, 2, 1, 0, 0, 0],
    [0, 1, 1, 1, 0, 0],
    [0, 0, 0, 1, 0, 0],
    [0, 1, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 1],
]
# Correct: 2 ACK + 2 BCC + 1 MEL + 1 NEV + 0 SCC + 1 SEK = 7 of 12.
ACCURACY = F(7, 12)
# support: ACK 3, BCC 3, MEL 3, NEV 1, SCC 1, SEK 1.
# recall = TP / support.
RECALL = {"ACK": F(2, 3), "BCC": F(2, 3), "MEL": F(1, 3), "NEV": F(1), "SCC": F(0), "SEK": F(1)}
# (2/3 + 2/3 + 1/3 + 1 + 0 + 1) / 6 = (11/3) / 6
BALANCED_ACCURACY = F(11, 18)
# predicted counts: ACK 2 (TP 2), BCC 4 (TP 2), MEL 2 (TP 1), NEV 2 (TP 1), SCC 0, SEK 2 (TP 1).
PRECISION = {"ACK": F(1), "BCC": F(1, 2), "MEL": F(1, 2), "NEV": F(1, 2), "SCC": F(0), "SEK": F(1, 2)}
# specificity = TN / (TN + FP), negatives = 12 - support; FP = predicted - TP.
#   ACK 9 neg, 0 FP -> 9/9; BCC 9 neg, 2 FP -> 7/9; MEL 9 neg, 1 FP -> 8/9;
#   NEV 11 neg, 1 FP -> 10/11; SCC 11 neg, 0 FP -> 11/11; SEK 11 neg, 1 FP -> 10/11.
SPECIFICITY = {"ACK": F(1), "BCC": F(7, 9), "MEL": F(8, 9), "NEV": F(10, 11), "SCC": F(1), "SEK": F(10, 11)}
# F1 = 2PR / (P + R):
#   ACK 2*(2/3)/(5/3) = 4/5; BCC 2*(1/3)/(7/6) = 4/7; MEL 2*(1/6)/(5/6) = 2/5;
#   NEV 2*(1/2)/(3/2) = 2/3; SCC P = R = 0 -> 0; SEK = 2/3.
F1 = {"ACK": F(4, 5), "BCC": F(4, 7), "MEL": F(2, 5), "NEV": F(2, 3), "SCC": F(0), "SEK": F(2, 3)}
SUPPORT = {"ACK": 3, "BCC": 3, "MEL": 3, "NEV": 1, "SCC": 1, "SEK": 1}


@pytest.fixture(scope="module")
def hand_metrics() -> dict:
    return compute_metrics(Y_TRUE, one_hot_proba(Y_PRED))


def test_hand_example_overall(hand_metrics):
    m = hand_metrics
    assert m["n"] == 12
    assert m["labels"] == list(LABELS)
    assert m["accuracy"] == pytest.approx(float(ACCURACY))
    assert m["balanced_accuracy"] == pytest.approx(float(BALANCED_ACCURACY))
    assert m["confusion_matrix"] == CM
    # Row-normalised: each row divided by its support.
    expected_norm = [[c / sum(row) for c in row] for row in CM]
    np.testing.assert_allclose(m["confusion_matrix_normalized"], expected_norm)


def test_hand_example_per_class(hand_metrics):
    per_class = hand_metrics["per_class"]
    assert list(per_class) == list(LABELS)
    for label in LABELS:
        v = per_class[label]
        assert v["precision"] == pytest.approx(float(PRECISION[label])), label
        assert v["recall"] == pytest.approx(float(RECALL[label])), label
        assert v["specificity"] == pytest.approx(float(SPECIFICITY[label])), label
        assert v["f1"] == pytest.approx(float(F1[label])), label
        assert v["support"] == SUPPORT[label]


def test_never_predicted_class_has_zero_precision_and_a_note(hand_metrics):
    assert hand_metrics["per_class"]["SCC"]["precision"] == 0.0
    scc_notes = [n for n in hand_metrics["notes"] if "SCC" in n and "never predicted" in n]
    assert len(scc_notes) == 1
    # No other class was left unpredicted.
    assert sum("never predicted" in n for n in hand_metrics["notes"]) == 1


def test_melanoma_counts(hand_metrics):
    # MEL rows: MEL->MEL (found), MEL->NEV (missed, benign), MEL->BCC (missed, malignant).
    assert hand_metrics["melanoma"] == {
        "recall": pytest.approx(1 / 3),
        "n_mel": 3,
        "n_called_benign": 1,
        "n_missed": 2,
    }


def test_auc_matches_sklearn_when_all_classes_present(hand_metrics):
    proba = one_hot_proba(Y_PRED)
    assert hand_metrics["auc_macro_ovr"] == pytest.approx(roc_auc_score(Y_TRUE, proba, multi_class="ovr"))
    assert hand_metrics["auc_weighted_ovr"] == pytest.approx(
        roc_auc_score(Y_TRUE, proba, multi_class="ovr", average="weighted")
    )


def test_absent_class_does_not_crash_and_is_noted():
    rng = np.random.default_rng(1)
    y = rng.choice([IDX[c] for c in LABELS if c != "MEL"], size=60)
    proba = rng.dirichlet(np.ones(C), size=60)
    m = compute_metrics(y, proba)

    auc_notes = [n for n in m["notes"] if n.startswith("AUC")]
    assert len(auc_notes) == 1 and "MEL" in auc_notes[0]
    present = [k for k in range(C) if k != IDX["MEL"]]
    expected = np.mean([roc_auc_score(y == k, proba[:, k]) for k in present])
    assert m["auc_macro_ovr"] == pytest.approx(expected)
    assert math.isnan(m["per_class"]["MEL"]["recall"])
    assert math.isnan(m["per_class"]["MEL"]["auc"])
    # Balanced accuracy averages only the 5 classes present.
    recalls = [m["per_class"][LABELS[k]]["recall"] for k in present]
    assert m["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    assert m["melanoma"]["n_mel"] == 0 and math.isnan(m["melanoma"]["recall"])

    flat = flatten_metrics(m)
    assert "test_recall_MEL" not in flat and "test_auc_MEL" not in flat
    assert flat["test_support_MEL"] == 0.0
    assert all(not math.isnan(v) for v in flat.values())
    # Strict JSON once NaN is mapped to null.
    json.dumps(to_jsonable(m), allow_nan=False)


def test_single_class_auc_is_nan_with_note():
    m = compute_metrics([1, 1, 1], one_hot_proba([1, 0, 1]))
    assert math.isnan(m["auc_macro_ovr"]) and math.isnan(m["auc_weighted_ovr"])
    assert any("fewer than 2 classes" in n for n in m["notes"])
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)


def test_log_loss_matches_sklearn():
    rng = np.random.default_rng(2)
    y = rng.choice([0, 1, 3, 4, 5], size=40)  # MEL absent: labels must still span all classes
    proba = rng.dirichlet(np.ones(C), size=40)
    m = compute_metrics(y, proba)
    assert m["log_loss"] == pytest.approx(sk_log_loss(y, proba, labels=list(range(C))))


def test_log_loss_is_clipped_to_stay_finite():
    proba = np.zeros((2, C))
    proba[:, IDX["BCC"]] = 1.0
    m = compute_metrics([IDX["BCC"], IDX["MEL"]], proba)
    # -(log(1 - 1e-15) + log(1e-15)) / 2
    assert m["log_loss"] == pytest.approx(-math.log(1e-15) / 2)


def _proba_with_top(pred: int, top: float) -> np.ndarray:
    row = np.full(C, (1 - top) / (C - 1))
    row[pred] = top
    return row


def test_ece_hand_example():
    # Confidence 0.9: one right, one wrong -> bin (0.867, 0.933]: |0.5 - 0.9| = 0.4, weight 2/4.
    # Confidence 0.5: both right        -> bin (0.467, 0.533]: |1.0 - 0.5| = 0.5, weight 2/4.
    # ECE = 0.5 * 0.4 + 0.5 * 0.5 = 0.45
    y = [0, 1, 2, 3]
    proba = np.stack([
        _proba_with_top(0, 0.9),
        _proba_with_top(0, 0.9),  # wrong: true class is 1
        _proba_with_top(2, 0.5),
        _proba_with_top(3, 0.5),
    ])  # fmt: skip
    m = compute_metrics(y, proba)
    assert m["ece"] == pytest.approx(0.45)
    bins = m["reliability"]
    assert bins["n_bins"] == 15 and len(bins["bin_edges"]) == 16
    assert sum(bins["count"]) == 4
    assert bins["count"][13] == 2 and bins["count"][7] == 2
    assert bins["accuracy"][13] == pytest.approx(0.5) and bins["confidence"][13] == pytest.approx(0.9)
    assert bins["accuracy"][7] == pytest.approx(1.0) and bins["confidence"][7] == pytest.approx(0.5)


def test_perfectly_calibrated_ece_is_zero():
    # Confidence 1.0 and always right.
    assert compute_metrics([0, 3], np.eye(C)[[0, 3]])["ece"] == pytest.approx(0.0)


def test_rejects_logits_and_bad_shapes():
    with pytest.raises(ValueError, match="logits"):
        compute_metrics([0, 1], np.array([[2.0, -1.0, 0, 0, 0, 0], [0.1, 3.0, 0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="sum to 1"):
        compute_metrics([0], np.full((1, C), 0.5))
    with pytest.raises(ValueError, match="shape"):
        compute_metrics([0, 1], np.full((2, 4), 0.25))
    with pytest.raises(ValueError):
        compute_metrics([6], one_hot_proba([0]))


def test_label_strings_are_accepted(hand_metrics):
    m = compute_metrics([t for t, _ in PAIRS], one_hot_proba(Y_PRED))
    assert m["accuracy"] == hand_metrics["accuracy"]
    assert m["confusion_matrix"] == hand_metrics["confusion_matrix"]


def test_flatten_metrics_names(hand_metrics):
    flat = flatten_metrics(hand_metrics)
    assert flat["test_accuracy"] == pytest.approx(7 / 12)
    assert flat["test_recall_MEL"] == pytest.approx(1 / 3)
    assert flat["test_precision_BCC"] == pytest.approx(0.5)
    assert flat["test_specificity_BCC"] == pytest.approx(7 / 9)
    assert flat["test_f1_ACK"] == pytest.approx(0.8)
    assert flat["test_support_ACK"] == 3.0
    assert flat["test_mel_called_benign"] == 1.0
    assert flat["test_mel_missed"] == 2.0
    for name in ("test_auc_macro", "test_auc_weighted", "test_ece", "test_log_loss", "test_balanced_accuracy"):
        assert name in flat
    assert all(isinstance(v, float) for v in flat.values())
    assert set(flatten_metrics(hand_metrics, prefix="val_")) == {k.replace("test_", "val_", 1) for k in flat}


def test_format_report(hand_metrics):
    ci = bootstrap_ci(Y_TRUE, Y_PRED, groups=np.arange(12), n_boot=50)
    text = format_report(hand_metrics, title="Test set", ci=ci)
    lines = text.splitlines()
    assert lines[0] == "Test set"
    assert "0.5833" in text  # accuracy 7/12
    assert "0.6111" in text  # balanced accuracy 11/18
    for label in LABELS:
        assert any(line.strip().startswith(label) for line in lines), label
    assert "Melanoma: 1/3 found" in text and "1 called benign" in text
    assert "never predicted" in text
    assert "95% CI" in text


# ---------------------------------------------------------------- bootstrap


def _patients(n_patients: int, accuracy: float, rows_per_patient: int = 1, seed: int = 0):
    """Each patient's rows are all right or all wrong; ``accuracy`` of patients are right."""
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, C, size=n_patients)
    correct = np.arange(n_patients) < round(accuracy * n_patients)
    y_pred = np.where(correct, y_true, (y_true + 1) % C)
    groups = np.repeat(np.arange(n_patients), rows_per_patient)
    return np.repeat(y_true, rows_per_patient), np.repeat(y_pred, rows_per_patient), groups


def test_bootstrap_contains_estimate_and_is_deterministic():
    y_true, y_pred, groups = _patients(60, 0.7, rows_per_patient=2)
    a = bootstrap_ci(y_true, y_pred, groups, seed=3)
    b = bootstrap_ci(y_true, y_pred, groups, seed=3)
    c = bootstrap_ci(y_true, y_pred, groups, seed=4)
    assert a == b
    assert a != c
    for name in ("accuracy", "balanced_accuracy"):
        assert a[name]["low"] <= a[name]["estimate"] <= a[name]["high"]
        assert a[name]["low"] < a[name]["high"]
        assert a[name]["n_boot"] == 1000
    assert a["accuracy"]["estimate"] == pytest.approx(0.7)


def test_bootstrap_narrows_with_more_patients():
    small = bootstrap_ci(*_patients(40, 0.75))["accuracy"]
    large = bootstrap_ci(*_patients(400, 0.75))["accuracy"]
    assert small["estimate"] == large["estimate"] == pytest.approx(0.75)
    # Width scales like 1/sqrt(n): about sqrt(10) = 3.2 times narrower.
    assert (large["high"] - large["low"]) < 0.5 * (small["high"] - small["low"])


def test_bootstrap_resamples_whole_patients():
    # One patient with 100 images, all wrong, and 100 patients with one image, all right.
    # Accuracy 0.5 either way. Resampling rows, the interval is tight around 0.5 (binomial,
    # n = 200). Resampling patients, the big patient is left out of about 37% of resamples
    # ((1 - 1/101)^101), and each of those resamples has accuracy exactly 1.0, so the upper
    # 97.5% quantile must be 1.0.
    y_true = np.zeros(200, dtype=int)
    y_pred = np.r_[np.ones(100, dtype=int), np.zeros(100, dtype=int)]
    groups = np.r_[np.zeros(100, dtype=int), np.arange(1, 101)]
    by_patient = bootstrap_ci(y_true, y_pred, groups, metrics=("accuracy",))["accuracy"]
    by_row = bootstrap_ci(y_true, y_pred, None, metrics=("accuracy",))["accuracy"]
    assert by_patient["estimate"] == by_row["estimate"] == pytest.approx(0.5)
    assert by_patient["high"] == pytest.approx(1.0)
    assert by_row["high"] < 0.6


def test_bootstrap_patient_ids_may_be_strings_and_unordered():
    y_true, y_pred, groups = _patients(30, 0.6, rows_per_patient=3)
    ids = np.array([f"PAT_{g}" for g in groups])
    perm = np.random.default_rng(0).permutation(len(ids))
    out = bootstrap_ci(y_true[perm], y_pred[perm], ids[perm])
    assert out["accuracy"]["estimate"] == pytest.approx(0.6)
    assert out["accuracy"]["low"] < 0.6 < out["accuracy"]["high"]


def test_bootstrap_class_recall_skips_resamples_without_the_class():
    y_true, y_pred, groups = _patients(100, 0.8)
    y_true[:2] = y_pred[:2] = IDX["MEL"]  # exactly 2 MEL patients, both found
    y_true[2:][y_true[2:] == IDX["MEL"]] = IDX["NEV"]
    y_pred[2:][y_pred[2:] == IDX["MEL"]] = IDX["NEV"]
    out = bootstrap_ci(y_true, y_pred, groups, metrics=("recall_MEL", "macro_f1"), n_boot=500)
    mel = out["recall_MEL"]
    # P(neither MEL patient drawn) = (0.98)^100 ~ 13%: those resamples are dropped, not zero.
    assert 300 < mel["n_boot"] < 500
    assert mel["estimate"] == mel["low"] == mel["high"] == 1.0
    assert out["macro_f1"]["n_boot"] == 500


def test_paired_difference_resamples_both_models_on_the_same_patients():
    # 50 patients (2 images each): a is wrong on patient 3 only, b on patients 3 and 7. On the same
    # resample b can never beat a, and a is strictly ahead exactly when patient 7 is drawn:
    # probability 1 - (49/50)^50 = 0.636. Resampled independently, b would often look better.
    y_true, _, groups = _patients(50, 1.0, rows_per_patient=2)
    y_a = np.where(groups == 3, (y_true + 1) % C, y_true)
    y_b = np.where(np.isin(groups, (3, 7)), (y_true + 1) % C, y_true)
    out = paired_bootstrap_diff(y_true, y_a, y_b, groups, metrics=("accuracy", "balanced_accuracy"),
                                n_boot=4000, seed=1)
    acc = out["accuracy"]
    assert acc["a"] == pytest.approx(0.98) and acc["b"] == pytest.approx(0.96)
    assert acc["estimate"] == pytest.approx(0.02)
    assert acc["low"] == 0.0 and acc["high"] > 0  # never below zero: the resamples are paired
    assert acc["p_a_better"] == pytest.approx(1 - (49 / 50) ** 50, abs=0.03)
    assert out["balanced_accuracy"]["estimate"] == pytest.approx(
        compute_metrics(y_true, one_hot_proba(list(y_a)))["balanced_accuracy"]
        - compute_metrics(y_true, one_hot_proba(list(y_b)))["balanced_accuracy"])
    same = paired_bootstrap_diff(y_true, y_b, y_b, groups, n_boot=200)["balanced_accuracy"]
    assert same["estimate"] == same["low"] == same["high"] == same["p_a_better"] == 0.0
    assert paired_bootstrap_diff(y_true, y_a, y_b, groups, seed=5) == paired_bootstrap_diff(y_true, y_a, y_b,
                                                                                            groups, seed=5)
    with pytest.raises(ValueError, match="differ in length: 100, 100, 99"):
        paired_bootstrap_diff(y_true, y_a, y_b[:-1], groups)


def test_replicated_difference_averages_each_sides_runs_on_the_same_resamples():
    # 50 patients: a's two runs are wrong on patient 3 and on patient 5; b's two runs both on
    # patients 3, 5 and 7. On any resample each a run is at least as good as each b run, and the
    # mean of a's runs is strictly ahead exactly when patient 3, 5 or 7 is drawn (a misses 3 and
    # 5 in one run of two, b in both): probability 1 - (47/50)^50. Never behind: paired resamples.
    y_true, _, groups = _patients(50, 1.0, rows_per_patient=2)
    wrong = lambda patients: np.where(np.isin(groups, patients), (y_true + 1) % C, y_true)  # noqa: E731
    a1, a2, b = wrong((3,)), wrong((5,)), wrong((3, 5, 7))
    out = replicated_bootstrap_diff(y_true, [a1, a2], [b, b], groups, metrics=("accuracy", "balanced_accuracy"),
                                    n_boot=2000, seed=1)
    acc = out["accuracy"]
    assert acc["a"] == pytest.approx(0.98) and acc["b"] == pytest.approx(0.94)
    assert acc["estimate"] == pytest.approx(0.04) and acc["low"] == 0.0 and acc["high"] > 0
    assert acc["p_a_better"] == pytest.approx(1 - (47 / 50) ** 50, abs=0.015)
    assert out["balanced_accuracy"]["a"] == pytest.approx(np.mean(
        [compute_metrics(y_true, one_hot_proba(list(y)))["balanced_accuracy"] for y in (a1, a2)]))
    # one run a side is paired_bootstrap_diff, to the last digit; two identical runs change nothing
    single = paired_bootstrap_diff(y_true, a1, b, groups, metrics=("accuracy", "recall_MEL"), n_boot=500, seed=2)
    assert replicated_bootstrap_diff(y_true, [a1], [b], groups, metrics=("accuracy", "recall_MEL"), n_boot=500,
                                     seed=2) == single
    assert replicated_bootstrap_diff(y_true, [a1, a1], [b, b], groups, metrics=("accuracy", "recall_MEL"),
                                     n_boot=500, seed=2) == single
    # each resample's difference is the mean of the runs' paired differences on it
    mixed = replicated_bootstrap_diff(y_true, [a1, a2], [b], groups, n_boot=300, seed=4)["balanced_accuracy"]
    each = [paired_bootstrap_diff(y_true, y, b, groups, n_boot=300, seed=4)["balanced_accuracy"] for y in (a1, a2)]
    assert mixed["estimate"] == pytest.approx(np.mean([e["estimate"] for e in each]))
    assert min(e["low"] for e in each) <= mixed["low"] <= max(e["low"] for e in each)
    with pytest.raises(ValueError, match="run 1 of side b predicts 99 rows, y_true has 100"):
        replicated_bootstrap_diff(y_true, [a1], [b, b[:-1]], groups)
    with pytest.raises(ValueError, match="each side needs at least one run's predictions, got 1 and 0"):
        replicated_bootstrap_diff(y_true, [a1], [], groups)


def test_bootstrap_rejects_unknown_metric():
    with pytest.raises(ValueError, match="unsupported"):
        bootstrap_ci([0, 1], [0, 1], [0, 1], metrics=("auc",))


def test_flatten_ci():
    ci = {"accuracy": {"estimate": 0.7, "low": 0.6, "high": 0.8, "n_boot": 1000}}
    assert flatten_ci(ci) == {"test_accuracy_low": 0.6, "test_accuracy_high": 0.8}


# ---------------------------------------------------------------- figures


def _assert_png(path, min_kb: int = 10):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > min_kb * 1024


def test_figures_are_written(tmp_path, hand_metrics):
    rng = np.random.default_rng(5)
    y = rng.choice([0, 1, 3, 4, 5], size=80)  # no MEL: ROC must skip it, not crash
    proba = rng.dirichlet(np.ones(C), size=80)
    proba[np.arange(80), y] += 1.0
    proba /= proba.sum(axis=1, keepdims=True)
    m = compute_metrics(y, proba)

    cm = hand_metrics["confusion_matrix"]
    figures = {
        "cm_counts.png": plot_confusion_matrix(cm, LABELS, normalized=False, title="counts"),
        "cm_norm.png": plot_confusion_matrix(cm, LABELS, normalized=True, title="normalised"),
        "roc.png": plot_roc_curves(y, proba, LABELS),
        "reliability.png": plot_reliability(m),
        "reliability_bins.png": plot_reliability(m["reliability"]),
    }
    for name, fig in figures.items():
        out = save_figure(fig, tmp_path / "figs" / name)
        assert out == tmp_path / "figs" / name
        _assert_png(out)


# ---------------------------------------------------------------- comparison


def _run(model, recipe, seed, bacc, acc, **extra):
    row = {
        "run_id": f"{model}-{recipe}-{seed}",
        "model": model,
        "recipe": recipe,
        "imbalance": "sampler",
        "seed": str(seed),  # MLflow params come back as strings
        "test_accuracy": acc,
        "test_accuracy_low": acc - 0.05,
        "test_accuracy_high": acc + 0.05,
        "test_balanced_accuracy": bacc,
        "test_balanced_accuracy_low": bacc - 0.1,
        "test_balanced_accuracy_high": bacc + 0.1,
        "test_auc_macro": 0.9,
        "best_val_bacc": bacc + 0.01,
    }
    row.update({f"test_recall_{label}": 0.5 for label in LABELS})
    row.update(extra)
    return row


RUNS = [
    _run("fusion", "lite0", 2, 0.8, 0.70, test_recall_MEL=0.75),
    _run("fusion", "lite0", 0, 0.6, 0.60, test_recall_MEL=0.25),
    _run("fusion", "lite0", 1, 0.7, 0.65, test_recall_MEL=0.5),
    _run("metadata", "logreg", 0, 0.75, 0.72),
]


def test_comparison_table_groups_seeds():
    table = comparison_table(RUNS)
    assert list(table["model"]) == ["metadata", "fusion"]  # 0.75 > mean(0.6, 0.7, 0.8)
    fusion = table.iloc[1]
    assert fusion["n_seeds"] == 3 and fusion["n_runs"] == 3
    assert fusion["seeds"] == [0, 1, 2]
    assert fusion["test_balanced_accuracy_mean"] == pytest.approx(0.7)
    assert fusion["test_balanced_accuracy_std"] == pytest.approx(0.1)  # sample std of .6/.7/.8
    assert fusion["test_accuracy_mean"] == pytest.approx(0.65)
    assert fusion["test_recall_MEL_mean"] == pytest.approx(0.5)
    assert fusion["test_balanced_accuracy_low_mean"] == pytest.approx(0.6)
    assert fusion["test_accuracy_high_mean"] == pytest.approx(0.70)
    assert fusion["best_val_bacc_mean"] == pytest.approx(0.71)
    single = table.iloc[0]
    assert single["n_seeds"] == 1 and single["seeds"] == [0]
    assert math.isnan(single["test_balanced_accuracy_std"])
    assert single["test_balanced_accuracy_mean"] == pytest.approx(0.75)


def test_comparison_never_pools_other_configs_or_splits_and_flags_reruns():
    base = [_run("fusion", "default", 42, 0.7, 0.7), _run("fusion", "default", 43, 0.7, 0.6)]
    rerun = _run("fusion", "default", 42, 0.7, 0.5)  # e.g. the Quickstart run again
    override = {**_run("fusion", "default", 44, 0.7, 0.9), "config": "bbbbbbbb"}
    other_split = {**_run("fusion", "default", 45, 0.7, 0.1), "split": "cccccccc"}
    for row in base + [rerun]:
        row.update(config="aaaaaaaa", split="dddddddd")
    override["split"] = "dddddddd"
    table = comparison_table([*base, rerun, override, other_split])
    assert len(table) == 3
    pooled = table[table["config"] == "aaaaaaaa"].iloc[0]
    assert pooled["n_runs"] == 3 and pooled["n_seeds"] == 2 and pooled["duplicate_seeds"]
    assert _cells(results_markdown(table).splitlines()[2 + list(table["config"]).index("aaaaaaaa")])[5:7] == \
        ["3", "42 (x2), 43"]


def test_comparison_table_keeps_missing_group_keys():
    rows = [{"model": "image", "seed": 0, "test_balanced_accuracy": 0.5}]
    table = comparison_table(rows)
    assert len(table) == 1 and table.loc[0, "recipe"] == "-"
    assert comparison_table([]).empty


def test_per_run_table():
    table = per_run_table(RUNS)
    assert len(table) == 4
    assert list(table["run_id"]) == ["fusion-lite0-0", "fusion-lite0-1", "fusion-lite0-2", "metadata-logreg-0"]
    assert list(table.columns[:7]) == ["run_id", "model", "recipe", "imbalance", "config", "split", "seed"]
    assert table["test_accuracy"].dtype.kind == "f"


def test_to_markdown():
    table = comparison_table(RUNS)
    cols = ["model", "recipe", "n_seeds", "seeds", "test_balanced_accuracy_mean", "test_balanced_accuracy_std"]
    md = to_markdown(table, columns=cols)
    lines = md.splitlines()
    assert len(lines) == 2 + len(table)
    assert [c.strip() for c in lines[0].strip("|").split("|")] == cols
    assert set(lines[1]) <= {"|", "-", ":", " "}
    # Numeric columns right-aligned.
    assert lines[1].split("|")[3].strip().endswith(":")
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    assert cells == ["fusion", "lite0", "3", "0, 1, 2", "0.700", "0.100"]
    # NaN std of the single-seed row is blank.
    assert [c.strip() for c in lines[2].strip("|").split("|")][-1] == ""


def test_to_markdown_escapes_pipes():
    md = to_markdown(pd.DataFrame({"name": ["a|b"], "x": [1.23456]}), floatfmt=".2f")
    assert "a\\|b" in md and "1.23" in md


def _cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_results_markdown_is_the_readme_table():
    lines = results_markdown(comparison_table(RUNS)).splitlines()
    assert len(lines) == 2 + 2
    assert _cells(lines[0])[-1] == "recall " + " / ".join(LABELS)
    # Three seeds: mean ± sample std, then the mean bootstrap bounds.
    assert _cells(lines[3]) == ["fusion", "lite0", "sampler", "-", "-", "3", "0, 1, 2", "0.650 ± 0.050 [0.600, 0.700]",
                                "0.700 ± 0.100 [0.600, 0.800]", "- / - / -", "0.900", "0.710 ± 0.100",
                                "0.50 / 0.50 / 0.50 / 0.50 / 0.50 / 0.50"]
    # One seed: no ± part.
    assert _cells(lines[2])[5:8] == ["1", "0", "0.720 [0.670, 0.770]"]


def test_metadata_markdown_shows_subsets_per_run():
    extra = {"test_complete_metadata_balanced_accuracy": 0.41, "test_complete_metadata_n": 87.0,
             "test_incomplete_metadata_balanced_accuracy": 0.93, "test_incomplete_metadata_n": 56.0,
             "test_masked_metadata_balanced_accuracy": 0.2, "test_masked_metadata_n": 143.0}
    extra.update(test_permuted_metadata_balanced_accuracy=0.35, test_permuted_metadata_complete_balanced_accuracy=0.3)
    rows = [_run("fusion", "lite0", 1, 0.7, 0.65, **extra), _run("image", "lite0", 0, 0.5, 0.5)]
    lines = metadata_markdown(rows).splitlines()
    assert _cells(lines[0])[-5:] == ["complete questionnaire", "incomplete questionnaire", "metadata masked (imputed)",
                                     "metadata permuted", "permuted, complete rows"]
    assert _cells(lines[2]) == ["fusion-l", "fusion", "lite0", "sampler", "-", "-", "1", "0.700", "0.410 (n=87)",
                                "0.930 (n=56)", "0.200", "0.350", "0.300"]
    assert _cells(lines[3])[-5:] == ["", "", "", "", ""]  # a run evaluated without the subsets


def test_results_markdown_reports_complete_questionnaire_rows():
    runs = [_run("fusion", "lite0", seed, 0.7, 0.65, test_complete_metadata_balanced_accuracy=value,
                 test_complete_metadata_auc_macro=0.9, test_complete_metadata_recall_MEL=0.75)
            for seed, value in ((0, 0.6), (1, 0.7))]
    row = _cells(results_markdown(comparison_table(runs)).splitlines()[2])
    assert row[9] == "0.650 ± 0.071 / 0.900 / 0.75"


def test_plot_comparison(tmp_path):
    _assert_png(save_figure(plot_comparison(comparison_table(RUNS)), tmp_path / "cmp.png"))
    _assert_png(save_figure(plot_comparison(per_run_table(RUNS)), tmp_path / "runs.png"))
