#!/usr/bin/env python3
"""The default head (``--head auto``) against a tuned linear probe, on real feature shards, over 5 seeds.

For each feature folder (stage-1 shards of real images; see the README's commands: held-out-style digits from
``data/prepare_digits.py`` and Animal-MNIST from ``data/prepare_animal_mnist.py --per-class 60``, both through
the default backbone) and each seed, on the run's own content-keyed split of that seed:

- ``default``: ``training.heads.fit_head`` with ``TrainOptions(seed=seed)`` (what ``train`` fits);
- ``probe``: the baseline, computed in the same run on the same split: standardised vectors (scikit-learn's
  ``StandardScaler`` fitted on the training rows), L-BFGS ``LogisticRegression``, ``C`` chosen on the
  validation split's macro-F1 over a half-decade grid 1e-4..1e2 (the way CLIP evaluates frozen features);
- ``old_default``: the head ``train`` fitted before issue 21 (Dense(256), batch 256, Adam), for reference.

Reports mean test macro-F1 per method and set, and the default's margin over the probe (target: ≥ -0.005).
Writes ``bench/results/heads-cpu.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import stage2_classify  # noqa: E402,F401  (sets KERAS_BACKEND=torch before torch loads)

C_GRID = tuple(float(c) for c in 10.0 ** np.arange(-4, 2.01, 0.5))


def macro_f1(y, pred) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y, pred, labels=np.unique(y), average="macro", zero_division=0))


def probe(ds, split) -> dict:
    """Standardise on the training rows, then L-BFGS logistic regression with C chosen on validation."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    tr, va, te = split["train"], split["validation"], split["test"]
    scaler = StandardScaler().fit(ds.features[tr])
    x = scaler.transform(ds.features)
    best = None
    for c in C_GRID:
        model = LogisticRegression(C=c, max_iter=2000).fit(x[tr], ds.y[tr])
        score = macro_f1(ds.y[va], model.predict(x[va]))
        if best is None or score > best[0]:
            best = (score, c, model)
    score, c, model = best
    return {"test_macro_f1": macro_f1(ds.y[te], model.predict(x[te])), "val_macro_f1": score, "C": c}


def head_score(ds, split, opts) -> dict:
    from stage2_classify.training.fit import predict_proba
    from stage2_classify.training.heads import fit_head

    t0 = time.perf_counter()
    fitted = fit_head(ds, split, opts, progress=False)
    proba = predict_proba(fitted.model, ds.features[split["test"]])
    choice = fitted.choice or {}
    return {"test_macro_f1": macro_f1(ds.y[split["test"]], proba.argmax(axis=1)), "kept": fitted.kind,
            "seconds": round(time.perf_counter() - t0, 2),
            "val_macro_f1": {k: choice[k].get("val_macro_f1") for k in ("linear", "mlp") if k in choice},
            "l2": (choice.get("linear") or {}).get("l2")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("features", nargs="+", help="name=FOLDER of stage-1 shards, e.g. digits=work/f_digits")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--skip-old", action="store_true", help="skip the pre-issue-21 head")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "heads-cpu.json"))
    args = p.parse_args(argv)
    from stage2_classify import TrainOptions, load_dataset
    from stage2_classify.training.fit import make_split

    result = {"when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()},
              "c_grid": C_GRID, "sets": {}}
    for spec in args.features:
        name, folder = spec.split("=", 1)
        ds = load_dataset(folder)
        runs = []
        for seed in range(args.seeds):
            opts = TrainOptions(seed=seed)
            split = make_split(ds, opts)
            row = {"seed": seed, "sizes": {k: int(len(v)) for k, v in split.items()},
                   "default": head_score(ds, split, opts), "probe": probe(ds, split)}
            if not args.skip_old:
                old = dataclasses.replace(opts, head="mlp", batch_size=256, weight_decay=0.0)
                row["old_default"] = head_score(ds, split, old)
            runs.append(row)
            print(name, seed, {k: round(v["test_macro_f1"], 3) for k, v in row.items() if isinstance(v, dict)
                               and "test_macro_f1" in v}, "kept", row["default"]["kept"], flush=True)
        methods = [m for m in ("default", "probe", "old_default") if m in runs[0]]
        mean = {m: float(np.mean([r[m]["test_macro_f1"] for r in runs])) for m in methods}
        result["sets"][name] = {"features": os.path.abspath(folder), "images": len(ds.y), "classes": len(ds.classes),
                                "backbone": ds.metadata.backbone, "mean_test_macro_f1": mean,
                                "default_minus_probe": mean["default"] - mean["probe"],
                                "target_met": mean["default"] >= mean["probe"] - 0.005, "runs": runs}
        print(name, {k: round(v, 4) for k, v in mean.items()}, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
