#!/usr/bin/env python3
"""Does JPEG draft-mode decoding change what the classifier learns? Same images, draft off and on.

Extracts the same images twice with stage 1 (``draft=False`` and ``draft=True``), then trains the default
stage-2 head (``TrainOptions()`` defaults, same seed, the same stratified split by path) on each and
reports both test accuracies. Also reported, because a small test set can hide a change:

* the head trained on full-decode features, evaluated on the draft features of the same test images;
* how close the features are (cosine, relative L2 per image);
* the backbone's own ImageNet top-1 (its classifier layer applied to the pooled features): how often the
  1000-class prediction is the same with and without draft — a far more sensitive check.

Which images: draft only changes anything for JPEGs at least twice the size the model needs (the decoder
then skips DCT detail). The demo data (Animal-MNIST) is 28×28 PNG, so draft never triggers there and its
accuracy is trivially unchanged; this script therefore uses the benchmark's large photographs
(``bench/images/large``, ~2000×1500 JPEG, 12 classes = the 12 source photos) by default.

    python bench/make_images.py && python bench/accuracy_draft.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("KERAS_BACKEND", "torch")


def sorted_dataset(shards):
    from stage2_classify.data.dataset import load_dataset

    ds = load_dataset(shards)
    order = np.argsort(ds.paths)
    ds.features, ds.labels, ds.paths = ds.features[order], ds.labels[order], ds.paths[order]
    return ds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", default=str(REPO / "bench" / "images" / "large"))
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-json", default=str(REPO / "bench" / "results" / "accuracy-draft-cpu.json"))
    args = p.parse_args(argv)

    import torch

    from stage1_extract import extract, get_backbone
    from stage1_extract.model.weights import build_torch_classifier, weights_source
    from stage2_classify.options import TrainOptions
    from stage2_classify.training.fit import evaluate_splits, make_split
    from stage2_classify.training.heads import fit_head

    runs, data = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-draft-") as tmp:
        for draft in (False, True):
            out = Path(tmp) / f"draft-{draft}"
            s = extract(args.images, out, backbone=args.backbone, provider="cpu", workers=args.workers,
                        draft=draft, progress=False)
            if s.errors:
                raise SystemExit(f"{s.errors} images failed to extract")
            runs[draft] = {"images": s.extracted, "images_per_second": round(s.images_per_second, 1),
                           "decode_worker_seconds": s.timings.get("decode_worker")}
            data[draft] = sorted_dataset(out)
    full, drafted = data[False], data[True]
    assert (full.paths == drafted.paths).all() and (full.labels == drafted.labels).all()

    opts = TrainOptions(seed=args.seed)
    split = make_split(full, opts)  # the same split (keyed by content) for both
    heads = {}
    for draft, ds in data.items():
        fitted = fit_head(ds, split, opts, progress=False)
        metrics = evaluate_splits(fitted.model, ds, split)
        heads[draft] = fitted.model
        runs[draft].update({"test_accuracy": metrics["test"]["accuracy"], "test_macro_f1": metrics["test"]["macro_f1"],
                            "test_n": metrics["test"]["n"], "epochs_run": len(fitted.history["loss"])})
    cross = evaluate_splits(heads[False], drafted, {"test": split["test"]})["test"]

    a, b = full.features, drafted.features
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    rel = np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)
    spec = get_backbone(args.backbone)
    clf = build_torch_classifier(spec, weights_source(spec).load_state_dict()).get_classifier()
    with torch.no_grad():
        top1 = [clf(torch.from_numpy(x)).argmax(1).numpy() for x in (a, b)]
    agree = float((top1[0] == top1[1]).mean())

    doc = {
        "benchmark": "accuracy_draft",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "images": args.images if not args.images.startswith(str(REPO)) else os.path.relpath(args.images, REPO),
        "backbone": args.backbone, "classes": full.classes, "seed": args.seed,
        "head": "stage2 TrainOptions() defaults",
        "full_decode": runs[False], "draft": runs[True],
        "head_trained_full_tested_on_draft_accuracy": cross["accuracy"],
        "feature_cosine": {"min": float(cos.min()), "median": float(np.median(cos)), "mean": float(cos.mean())},
        "feature_relative_l2": {"median": float(np.median(rel)), "max": float(rel.max())},
        "imagenet_top1_agreement": agree,
        "note": "draft only applies to JPEGs ≥2× the needed size; the Animal-MNIST demo (28×28 PNG) never "
                "triggers it, so the large bench photographs are used instead (classes = source photos)",
    }
    print(f"{full.classes.__len__()} classes, {len(full.paths)} images, test n={runs[False]['test_n']}")
    print(f"  full decode: test accuracy {runs[False]['test_accuracy']:.4f}   "
          f"({runs[False]['images_per_second']} img/s extraction)")
    print(f"  draft      : test accuracy {runs[True]['test_accuracy']:.4f}   "
          f"({runs[True]['images_per_second']} img/s extraction)")
    print(f"  head trained on full, tested on draft features: {cross['accuracy']:.4f}")
    print(f"  feature cosine min {cos.min():.5f} median {np.median(cos):.5f}; relative L2 median {np.median(rel):.4f}")
    print(f"  ImageNet top-1 agreement draft vs full: {agree:.4f}")
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out_json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
