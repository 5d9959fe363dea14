#!/usr/bin/env python3
"""Frozen head vs LP-FT vs plain fine-tuning, on real image sets, on the frozen run's own test images.

For each set: the images are written (``data/prepare_digits.py``: scikit-learn's handwritten digits;
``data/prepare_animal_mnist.py``: Animal-MNIST), stage 1 extracts them with the default backbone
(EfficientNet-Lite0, 224 px), ``train`` fits the default head (the frozen baseline, same run, same split), then
``finetune`` runs twice from that run at ``--input-size``: LP-FT (the default, ``head_init="probe"``) and plain
fine-tuning (``head_init="random"``). Every number comes from the fine-tuned run's ``comparison.json``: test
accuracy with a 95% bootstrap interval for both runs on the same test images, the paired difference with its
interval and McNemar's p, seconds per epoch and in all. Results: ``bench/results/finetune-<device>.json``.

    python bench/finetune.py                                   # both sets, 128 px, CPU (~35 min on 2 cores)
    python bench/finetune.py --sets digits --epochs 5          # quicker look
    python bench/finetune.py --device cuda --input-size 224    # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "data"))


def prepare(name: str, where: Path, per_class: int) -> Path:
    out = where / name
    if name == "digits":
        from prepare_digits import prepare as digits

        return digits(out, per_class=per_class)
    from prepare_animal_mnist import prepare as animals

    animals(out, per_class=per_class, progress=False)
    return out


def one_set(name: str, work: Path, args) -> dict:
    from stage1_extract import extract
    from stage2_classify import finetune, train

    images = prepare(name, work, args.per_class)
    t0 = time.perf_counter()
    extract(images, work / f"{name}-features", progress=False)
    extract_s = time.perf_counter() - t0
    frozen = train(work / f"{name}-features", work / f"{name}-frozen", progress=False)
    result = {"images": int(frozen.metrics["train"]["n"] + frozen.metrics["validation"]["n"]
                            + frozen.metrics["test"]["n"]), "extract_seconds": round(extract_s, 1),
              "frozen_test_accuracy": frozen.metrics["test"]["accuracy"],
              "frozen_test_ci95": frozen.metrics["test"]["ci95"]["accuracy"]}
    for variant, head_init in (("lp_ft", "probe"), ("plain_ft", "random")):
        out = work / f"{name}-{variant}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        ft = finetune(work / f"{name}-frozen", out, input_size=args.input_size, epochs=args.epochs,
                      head_init=head_init, device=args.device, progress=args.progress)
        seconds = time.perf_counter() - t0
        c = ft.comparison
        epochs = len(ft.history.get("loss", []))
        train_s = json.loads((out / "run.json").read_text())["train_seconds"]
        result[variant] = {
            "test_accuracy": c["finetuned"]["accuracy"], "test_ci95": c["finetuned"]["ci95"]["accuracy"],
            "test_macro_f1": c["finetuned"]["macro_f1"], "frozen_same_images": c["frozen"]["accuracy"],
            "difference_vs_frozen": c["accuracy_difference"], "test_images": c["test_images"],
            "epochs_run": epochs, "best_epoch": json.loads((out / "run.json").read_text())["best_epoch"],
            "seconds_per_epoch": round(train_s / max(epochs, 1), 1), "seconds_total": round(seconds, 1),
        }
        print(f"{name} {variant}: test accuracy {c['finetuned']['accuracy']:.3f} vs frozen "
              f"{c['frozen']['accuracy']:.3f} on {c['test_images']} images; {seconds:.0f}s", flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", default="digits,animals", help="comma-separated: digits, animals")
    p.add_argument("--per-class", type=int, default=60, help="images per class (default 60: 600 per set)")
    p.add_argument("--input-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=None, help="default: finetune's default")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--work", default=str(ROOT / "bench" / "work-finetune"))
    p.add_argument("--out", default=None, help="default bench/results/finetune-<device>.json")
    p.add_argument("--progress", action="store_true", help="Keras' per-epoch lines")
    args = p.parse_args(argv)
    if args.epochs is None:
        from stage2_classify import FinetuneOptions

        args.epochs = FinetuneOptions.epochs
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "device": args.device},
               "input_size": args.input_size, "epochs": args.epochs, "backbone": "efficientnet_lite0",
               "sets": {}}
    for name in [s.strip() for s in args.sets.split(",") if s.strip()]:
        results["sets"][name] = one_set(name, work, args)
    out = Path(args.out or ROOT / "bench" / "results" / f"finetune-{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
