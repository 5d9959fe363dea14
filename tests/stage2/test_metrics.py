"""Metrics: scikit-learn's definitions, null for undefined values, bootstrap intervals, calibration."""

import numpy as np
import pytest
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, log_loss,
                             roc_auc_score, top_k_accuracy_score)

from stage2_classify.evaluation.calibration import reliability
from stage2_classify.evaluation.metrics import _summary_from_confusion, classification_metrics, format_metric


def noisy(n=600, k=4, seed=0, strength=1.5):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), y] += strength
    p = np.exp(logits)
    return y, p / p.sum(axis=1, keepdims=True)


def test_agrees_with_scikit_learn():
    y, p = noisy()
    m = classification_metrics(y, p, list("abcd"))
    pred = p.argmax(1)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["roc_auc_ovr"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert m["log_loss"] == pytest.approx(log_loss(y, p), rel=1e-4)
    assert m["top_k_accuracy"]["2"] == pytest.approx(top_k_accuracy_score(y, p, k=2))
    assert m["confusion_matrix"] == confusion_matrix(y, pred).tolist()
    # the bootstrap's vectorised statistic is the same definition as scikit-learn's
    fast = _summary_from_confusion(confusion_matrix(y, pred))
    assert fast["accuracy"] == pytest.approx(m["accuracy"]) and fast["macro_f1"] == pytest.approx(m["macro_f1"])
    assert fast["balanced_accuracy"] == pytest.approx(m["balanced_accuracy"])


def test_bootstrap_intervals_hold_the_estimate_and_shrink_with_more_rows():
    y, p = noisy(n=200, seed=1)
    small = classification_metrics(y, p, list("abcd"))
    y, p = noisy(n=5000, seed=1)
    big = classification_metrics(y, p, list("abcd"))
    for m in (small, big):
        for name in ("accuracy", "balanced_accuracy", "macro_f1"):
            low, high = m["ci95"][name]
            assert low <= m[name] <= high
    width = lambda m: m["ci95"]["accuracy"][1] - m["ci95"]["accuracy"][0]  # noqa: E731
    assert width(big) < width(small) / 3
    assert classification_metrics(y, p, list("abcd"))["ci95"] == big["ci95"]  # seeded: reproducible
    text = format_metric(small, "accuracy", "test accuracy")
    low, high = small["ci95"]["accuracy"]
    assert text == f"test accuracy {small['accuracy']:.3f} [{low:.3f}–{high:.3f}]"


def test_undefined_values_are_null_not_zero():
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.2, 0.8, 0.0], [0.3, 0.7, 0.0]])
    m = classification_metrics(y, p, ["a", "b", "never"])
    never = m["per_class"]["never"]
    assert never == {"precision": None, "recall": None, "specificity": 1.0, "f1": None, "support": None,
                     "roc_auc": None}
    assert m["per_class"]["a"]["roc_auc"] == 1.0 and m["roc_auc_ovr"] == 1.0
    empty = classification_metrics(np.zeros(0, int), np.zeros((0, 3)), ["a", "b", "c"])
    assert empty["n"] == 0 and empty["accuracy"] is None and empty["per_class"]["a"]["support"] is None


def test_expected_calibration_error():
    rng = np.random.default_rng(0)
    n = 20000
    conf = rng.uniform(0.5, 1.0, n)
    correct = rng.uniform(size=n) < conf  # calibrated: right as often as it claims
    y = np.where(correct, 0, 1)
    p = np.stack([conf, 1 - conf], axis=1)
    assert reliability(y, p)["ece"] < 0.02
    overconfident = np.stack([np.full(n, 0.99), np.full(n, 0.01)], axis=1)
    y = (rng.uniform(size=n) < 0.3).astype(int)  # right 70% of the time, claims 99%
    cal = reliability(y, overconfident)
    assert cal["ece"] == pytest.approx(0.29, abs=0.02)
    assert sum(b["count"] for b in cal["bins"]) == n
