"""Frozen vs fine-tuned on the very same test images: both runs' metrics with intervals, and a paired test.

Rows are matched by content identity (the frozen run's ``predictions.parquet`` against the fine-tuned
vectors), so the comparison holds image for image. The difference in accuracy gets a paired bootstrap 95%
interval (``scipy.stats.bootstrap``, ``paired=True``: the same resampled images for both) and McNemar's exact
test on the discordant images (``scipy.stats.binomtest``); macro-F1 is shown for both with its own interval.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stage2_classify.evaluation.metrics import classification_metrics


def paired_accuracy(frozen_ok: np.ndarray, tuned_ok: np.ndarray, seed: int = 0) -> dict:
    """Difference in accuracy (tuned − frozen) with a paired bootstrap 95% interval and McNemar's exact p."""
    from scipy.stats import binomtest, bootstrap

    a, b = np.asarray(tuned_ok, float), np.asarray(frozen_ok, float)
    diff = float(a.mean() - b.mean()) if len(a) else float("nan")
    only_tuned, only_frozen = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    out = {"n": int(len(a)), "difference": diff, "ci95": None, "only_finetuned_right": only_tuned,
           "only_frozen_right": only_frozen, "mcnemar_p": 1.0}
    if only_tuned + only_frozen:
        out["mcnemar_p"] = float(binomtest(only_tuned, only_tuned + only_frozen, 0.5).pvalue)
    if len(a) > 1 and np.ptp(a - b) > 0:
        res = bootstrap((a, b), lambda x, y, axis=-1: x.mean(axis=axis) - y.mean(axis=axis), paired=True,
                        vectorized=True, n_resamples=2000, confidence_level=0.95, method="percentile",
                        random_state=np.random.default_rng(seed))
        out["ci95"] = [float(res.confidence_interval.low), float(res.confidence_interval.high)]
    elif len(a):
        out["ci95"] = [diff, diff]
    return out


def compare_with_frozen(frozen_run: Path, classes: list[str], content_ids, y: np.ndarray, proba: np.ndarray,
                        test_rows: np.ndarray, seed: int = 0) -> dict:
    """The ``comparison.json`` of a fine-tuned run: frozen and fine-tuned test metrics on the shared images."""
    import pandas as pd

    frozen = pd.read_parquet(frozen_run / "predictions.parquet")
    frozen = frozen[frozen["split"] == "test"].drop_duplicates("content_id").set_index("content_id")
    ids = np.asarray(content_ids, dtype=object)[test_rows]
    shared = np.asarray([cid in frozen.index for cid in ids])
    rows = test_rows[shared]
    prob_cols = [f"prob_{c}" for c in classes]
    frozen_proba = frozen.loc[ids[shared], prob_cols].to_numpy(np.float32)
    y_test = y[rows]
    both = {"frozen": classification_metrics(y_test, frozen_proba, classes, bootstrap=True, seed=seed),
            "finetuned": classification_metrics(y_test, proba[rows], classes, bootstrap=True, seed=seed)}
    keep = ("n", "accuracy", "balanced_accuracy", "macro_f1", "ci95")
    return {
        "frozen_run": str(frozen_run),
        "test_images": int(len(rows)),
        "test_images_not_in_frozen_run": int((~shared).sum()),
        **{name: {k: m.get(k) for k in keep} for name, m in both.items()},
        "accuracy_difference": paired_accuracy(frozen_proba.argmax(1) == y_test, proba[rows].argmax(1) == y_test,
                                               seed),
    }


def format_comparison(c: dict) -> list[str]:
    """Summary lines: both accuracies with intervals, the paired difference and its test."""
    def acc(m):
        ci = (m.get("ci95") or {}).get("accuracy")
        return f"{m['accuracy']:.3f}" + (f" [{ci[0]:.3f}–{ci[1]:.3f}]" if ci else "")

    d = c["accuracy_difference"]
    ci = d.get("ci95")
    return [f"  frozen     test accuracy {acc(c['frozen'])}  macro-F1 {c['frozen']['macro_f1']:.3f}  (same "
            f"{c['test_images']} test images)",
            f"  fine-tuned test accuracy {acc(c['finetuned'])}  macro-F1 {c['finetuned']['macro_f1']:.3f}",
            f"  difference {d['difference']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")
            + f" (paired bootstrap 95%); McNemar exact p = {d['mcnemar_p']:.3g} "
            f"({_images(d['only_finetuned_right'])} right only after fine-tuning, {d['only_frozen_right']} only "
            "before)"]


def _images(n: int) -> str:
    return f"{n} image" + ("" if n == 1 else "s")
