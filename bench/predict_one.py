#!/usr/bin/env python3
"""One-image prediction from the CLI: the short way (``stage2-classify predict --images ONE``, issue 24) against
the general path (the same command with ``--features``: worker pool, feature cache, Keras head) and against
running the run's exported ONNX file with the light pixel loader (README, "One deployable file"), in one run.

Each measurement is a fresh process, as a user's command is (interpreter start, imports, model load, one
image), repeated ``--repeats`` times; wall time (median, min) and peak RSS (``ru_maxrss`` of the child) are
recorded. The general path gets a fresh ``--features`` folder each time, so it extracts the image as a first
prediction on a new image does. Set-up (not timed): scikit-learn's digits (``data/prepare_digits.py``),
stage 1 with the default backbone, the default head, ``stage2-classify export``. The three answers for the
image are checked to agree (probability within 1e-4).

    python bench/predict_one.py [--out-json bench/results/predict-one-cpu.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEPLOY = """
import json, sys, onnxruntime as ort
from stage1_extract.pixels import load_pixels
sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
meta = sess.get_modelmeta().custom_metadata_map
labels, prep = json.loads(meta["labels"]), json.loads(meta["preprocessing"])
pixels = load_pixels([sys.argv[2]], prep)
probs, ood = sess.run(None, {"images": pixels.array})
print(json.dumps({"predicted": labels[int(probs[0].argmax())], "probability": float(probs[0].max())}))
"""


def run_measured(args: list[str], env: dict) -> tuple[float, float, str]:
    """(seconds, peak RSS in MiB, stdout) of one child process, reaped with wait4 to read its own peak RSS."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=errors, env=env)
        out = proc.stdout.read().decode()
        _, status, usage = os.wait4(proc.pid, 0)
        errors.seek(0)
        err = errors.read().decode(errors="replace")
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:5])}… failed:\n{err[-3000:]}")
    return seconds, usage.ru_maxrss / 1024, out


def summary(samples: list[tuple[float, float, str]]) -> dict:
    secs = [s for s, _, _ in samples]
    return {"median_s": round(statistics.median(secs), 3), "min_s": round(min(secs), 3),
            "all_s": [round(s, 3) for s in secs], "peak_rss_mib": round(max(r for _, r, _ in samples), 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=None, help="folder for images, features and the run (default: a temp dir)")
    p.add_argument("--per-class", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out-json", default=str(REPO / "bench" / "results" / "predict-one-cpu.json"))
    args = p.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="predict-one-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "KERAS_BACKEND": "torch", "CUDA_VISIBLE_DEVICES": ""}
    py = sys.executable
    images, feats, run, model = work / "digits", work / "features", work / "run", work / "model.onnx"
    if not (run / "run.json").is_file():
        subprocess.run([py, str(REPO / "data" / "prepare_digits.py"), "--out", str(images), "--per-class",
                        str(args.per_class)], check=True, env=env)
        subprocess.run([py, "-m", "stage1_extract", "--images", str(images), "--out", str(feats), "--no-progress"],
                       check=True, env=env)
        subprocess.run([py, "-m", "stage2_classify", "train", "--features", str(feats), "--out", str(run),
                        "--no-progress"], check=True, env=env, stdout=subprocess.DEVNULL)
    if not model.is_file():
        subprocess.run([py, "-m", "stage2_classify", "export", "--run", str(run), "--out", str(model),
                        "--images", str(images)], check=True, env=env, stdout=subprocess.DEVNULL)
    one = str(sorted(images.rglob("*.png"))[0])
    cli = [py, "-m", "stage2_classify", "predict", "--images", one, "--run", str(run), "--no-progress"]
    results = {"short": [], "general": [], "exported_onnx": []}
    answers = {}
    for i in range(args.repeats):  # interleaved, so load on the machine hits every variant alike
        results["short"].append(run_measured(cli + ["--out", str(work / "short.csv")], env))
        results["general"].append(run_measured(cli + ["--out", str(work / "general.csv"), "--features",
                                                      str(work / f"cache-{time.time_ns()}")], env))
        results["exported_onnx"].append(run_measured([py, "-c", DEPLOY, str(model), one], env))
    import pandas as pd

    for name in ("short", "general"):
        row = pd.read_csv(work / f"{name}.csv").iloc[0]
        answers[name] = {"predicted": str(row["predicted"]), "probability": float(row["probability"])}
    answers["exported_onnx"] = json.loads(results["exported_onnx"][-1][2].strip().splitlines()[-1])
    probs = [a["probability"] for a in answers.values()]
    agree = len({a["predicted"] for a in answers.values()}) == 1 and max(probs) - min(probs) <= 1e-4
    report = {
        "what": "one-image CLI prediction: short way vs general path vs the exported ONNX file (fresh processes)",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "setup": {"images": f"sklearn digits, {args.per_class} per class", "backbone": "efficientnet_lite0",
                  "image": os.path.relpath(one, work), "repeats": args.repeats},
        "results": {k: summary(v) for k, v in results.items()},
        "answers": answers, "answers_agree_within_1e-4": agree,
    }
    report["short_vs_general_speedup"] = round(report["results"]["general"]["median_s"]
                                               / report["results"]["short"]["median_s"], 2)
    Path(args.out_json).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["results"], indent=1), "\nanswers agree:", agree)
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
