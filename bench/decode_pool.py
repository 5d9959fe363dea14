#!/usr/bin/env python3
"""Decode pool at any batch size: stage 1 end to end with a model much faster than decoding.

With a tiny ONNX model (one 3×3 convolution, far faster than decoding a photograph), stage 1's speed is the
decode pool's: how well it keeps every worker busy. A pool whose task is a whole batch leaves workers idle
at large batch sizes (fewer tasks than workers, the first batch waits for one worker to decode all of it,
the last round runs on few workers). The target: batch 256 at ≥ 0.9 of batch 16 on the same machine.

Measured in the same run, interleaved round by round, each in a fresh process (the page cache warmed
first): this tree's pool at batch 16 (the baseline) and 256, and — when ``--compare-rev`` names a commit
— the pool of that commit at the same sizes, run through today's ``extract`` (only ``DecodePool`` swapped).

    python bench/make_images.py --small 0 --large 300   # once: the images (not committed)
    python bench/decode_pool.py                          # 300 large photos, 2 workers, 3 rounds (~2 min)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BEFORE = "7926108"  # the last commit with the batch-per-task pool (issue 16)


def _list(images: Path, n: int) -> list[Path]:
    files = sorted(images.rglob("*.jpg"))[:n]
    if len(files) < n:
        raise SystemExit(f"{images} has {len(files)} images, {n} wanted: python bench/make_images.py --small 0 "
                         f"--large {n}")
    return files


def run_one(cfg: dict) -> dict:
    """One stage-1 run in this (fresh) process: returns the loop's img/s from the run summary."""
    import stage1_extract.loader as loader
    from stage1_extract import extract

    if cfg["pool"] != "this tree":
        # Spawned workers import the old module by name: write it where they can import it.
        source = subprocess.run(["git", "show", f"{cfg['pool']}:stage1_extract/loader.py"], cwd=REPO, check=True,
                                capture_output=True, text=True).stdout
        shim = Path(cfg["tmp"]) / "pool_before"
        shim.mkdir(exist_ok=True)
        (shim / "loader_before.py").write_text(source)
        sys.path.insert(0, str(shim))
        os.environ["PYTHONPATH"] = f"{shim}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
        import loader_before

        loader.DecodePool = loader_before.DecodePool
    with tempfile.TemporaryDirectory(dir=cfg["tmp"]) as out:
        s = extract(cfg["images"], out, onnx=cfg["onnx"], input_size=cfg["input_size"], batch_size=cfg["batch_size"],
                    workers=cfg["workers"], threads=cfg["threads"], progress=False)
    if s.errors or s.extracted != cfg["n"]:
        raise RuntimeError(f"expected {cfg['n']} images and no errors, got {s.extracted} and {s.errors}")
    return {"images_per_second": s.images_per_second, "seconds": s.seconds, "timings": s.timings}


def _run_fresh(cfg: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--part", json.dumps(cfg)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        raise RuntimeError(f"run {cfg} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", default=str(REPO / "bench" / "images" / "large"))
    p.add_argument("--n", type=int, default=300, help="images (the first N of --images; default 300)")
    p.add_argument("--batch-sizes", default="16,256")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="ORT threads (default: the project's)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--compare-rev", default=BEFORE, help="also run the pool of this commit ('' to skip)")
    p.add_argument("--out-json", default=str(REPO / "bench" / "results" / "decode-pool-cpu.json"))
    p.add_argument("--part", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.part:
        print(json.dumps(run_one(json.loads(args.part))))
        return 0

    from tests.helpers import make_tiny_onnx

    files = _list(Path(args.images), args.n)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    pools = ["this tree"] + ([args.compare_rev] if args.compare_rev else [])
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "images"
        for f in files:  # the first N images, as a class tree of links
            dest = tree / f.parent.name / f.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(f)
            dest.read_bytes()  # warm the page cache
        onnx = make_tiny_onnx(Path(tmp) / "tiny.onnx", input_size=args.input_size)
        runs: dict[str, list[dict]] = {}
        for r in range(args.rounds):
            for pool in pools:
                for bs in sizes:
                    cfg = {"pool": pool, "batch_size": bs, "images": str(tree), "onnx": str(onnx), "n": len(files),
                           "input_size": args.input_size, "workers": args.workers, "threads": args.threads,
                           "tmp": tmp}
                    res = _run_fresh(cfg)
                    key = f"{pool} · batch {bs}"
                    runs.setdefault(key, []).append(res)
                    print(f"round {r + 1}: {key:28s} {res['images_per_second']:7.1f} img/s", flush=True)
    median = {k: statistics.median(x["images_per_second"] for x in v) for k, v in runs.items()}
    ratios = {}
    for pool in pools:
        base = median[f"{pool} · batch {sizes[0]}"]
        for bs in sizes[1:]:
            ratios[f"{pool}: batch {bs} / batch {sizes[0]}"] = round(median[f"{pool} · batch {bs}"] / base, 3)
    lines = [f"{len(files)} images from {args.images} ({args.workers} workers, tiny ONNX model at "
             f"{args.input_size}px, {args.rounds} interleaved rounds, median img/s)"]
    lines += [f"  {k:30s} {v:7.1f}" for k, v in median.items()]
    lines += [f"  {k}: {v:.2f}" for k, v in ratios.items()]
    print("\n".join(lines))
    result = {
        "benchmark": "decode_pool", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/decode_pool.py"] + (argv if argv is not None else sys.argv[1:])),
        "cpus": len(os.sched_getaffinity(0)), "loadavg_after": list(os.getloadavg()),
        "images": len(files), "workers": args.workers, "input_size": args.input_size, "rounds": args.rounds,
        "median_images_per_second": {k: round(v, 1) for k, v in median.items()},
        "ratios": ratios, "target": f"batch {sizes[-1]} >= 0.9 x batch {sizes[0]} (this tree)",
        "target_met": all(v >= 0.9 for k, v in ratios.items() if k.startswith("this tree")),
        "runs": runs, "table": lines,
    }
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
