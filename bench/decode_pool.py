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
    python bench/decode_pool.py                          # 2 scenarios × 300 images, 2 workers, 3 rounds

Two scenarios: ``photos`` (real decoding of large photographs) and ``fixed`` (every image costs a fixed
``--fixed-ms`` of sleep through the test fault hook, ``tests/support/faults.py``, on top of decoding a small photo). The second measures
the pool's scheduling alone: on a shared, loaded machine an idle worker's core is taken by other processes,
so real decoding hides the idle time the fixed cost shows.
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
#: modules an old pool imports, and where they live now (the flat layout of before issue 23)
OLD_MODULES = {"decode_worker": "decoding.worker", "preprocessing": "model.preprocessing", "shm": "decoding.shm"}
#: names of the old ``decode`` module that ``decoding.files`` holds now (the rest: ``decoding.image``)
FILE_NAMES = {"DecodeError", "FileResult", "MAX_FILE_BYTES", "TRANSIENT_ERRNOS", "content_id", "read_ahead", "read_file",
              "read_image"}


def _new_layout(source: str) -> str:
    """An old pool's source with its stage-1 imports pointed at today's modules."""
    import re

    for old, new in OLD_MODULES.items():
        source = source.replace(f"from stage1_extract.{old} import", f"from stage1_extract.{new} import")

    def split(found) -> str:
        indent, names = found[1], [n.strip() for n in found[2].split(",")]
        files, image = [n for n in names if n in FILE_NAMES], [n for n in names if n not in FILE_NAMES]
        lines = [f"{indent}from stage1_extract.decoding.files import {', '.join(files)}"] if files else []
        return "\n".join(lines + ([f"{indent}from stage1_extract.decoding.image import {', '.join(image)}"]
                                   if image else []))

    return re.sub(r"^(\s*)from stage1_extract\.decode import (.+)$", split, source, flags=re.MULTILINE)


def _list(images: Path, n: int) -> list[Path]:
    files = sorted(images.rglob("*.jpg"))[:n]
    if len(files) < n:
        raise SystemExit(f"{images} has {len(files)} images, {n} wanted: python bench/make_images.py --small 0 "
                         f"--large {n}")
    return files


def run_one(cfg: dict) -> dict:
    """One stage-1 run in this (fresh) process: returns the loop's img/s from the run summary."""
    import stage1_extract.decoding.pool as loader
    from stage1_extract import extract

    if cfg["pool"] != "this tree":
        # Spawned workers import the old module by name: write it where they can import it.
        source = subprocess.run(["git", "show", f"{cfg['pool']}:stage1_extract/loader.py"], cwd=REPO, check=True,
                                capture_output=True, text=True).stdout
        source = _new_layout(source)
        shim = Path(cfg["tmp"]) / "pool_before"
        shim.mkdir(exist_ok=True)
        # its reader predates read_image: give it the same fault hook (the fixed decode cost of --fixed-ms)
        source += ("\n_read_and_decode = _decode_one\n\n\ndef _decode_one(path, *args):\n"
                   "    from tests.support.faults import inject\n\n"
                   "    inject(path)\n    return _read_and_decode(path, *args)\n")
        (shim / "loader_before.py").write_text(source)
        sys.path.insert(0, str(shim))
        os.environ["PYTHONPATH"] = f"{shim}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
        import loader_before

        loader.DecodePool = loader_before.DecodePool
    with tempfile.TemporaryDirectory(dir=cfg["tmp"]) as out:
        model = {"backbone": cfg["backbone"]} if cfg["backbone"] else {"onnx": cfg["onnx"],
                                                                     "input_size": cfg["input_size"]}
        s = extract(cfg["images"], out, **model, batch_size=cfg["batch_size"], workers=cfg["workers"],
                    threads=cfg["threads"], progress=False)
    if s.errors or s.extracted != cfg["n"]:
        raise RuntimeError(f"expected {cfg['n']} images and no errors, got {s.extracted} and {s.errors}")
    return {"images_per_second": s.images_per_second, "seconds": s.seconds, "timings": s.timings}


def _run_fresh(cfg: dict, env: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--part", json.dumps(cfg)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **env})
    if proc.returncode != 0:
        raise RuntimeError(f"run {cfg} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _scenario_tree(name: str, args, tmp: Path) -> tuple[Path, int, dict, str]:
    """(image tree, images, environment, description) of one scenario."""
    tree = tmp / name
    if name == "photos":
        files = [f.resolve() for f in _list(Path(args.images), args.n)]
        for f in files:  # the first N images, as a class tree of links
            dest = tree / f.parent.name / f.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(f)
            dest.read_bytes()  # warm the page cache
        return tree, len(files), {}, f"{len(files)} photos from {args.images} (real decoding)"
    from tests.support.helpers import make_image_tree
    from tests.support.faults import fault_env

    make_image_tree(tree, per_class=-(-args.n // 3), size=64)
    n = len(list(tree.rglob("*.jpg")))
    # every read sleeps: decoding costs the same whatever else the shared machine runs
    return tree, n, fault_env(f"sleep{args.fixed_ms}:*"), \
        f"{n} small photos, each costing a fixed {args.fixed_ms} ms (sleep) on top of its decoding"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenarios", default="photos,fixed",
                   help="photos: real photographs (bench/images/large); fixed: a decode of fixed cost")
    p.add_argument("--images", default=str(REPO / "bench" / "images" / "large"))
    p.add_argument("--n", type=int, default=300, help="images per scenario (default 300)")
    p.add_argument("--fixed-ms", type=int, default=20, help="the fixed scenario's cost per image (ms)")
    p.add_argument("--batch-sizes", default="16,256")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="ORT threads (default: the project's)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--input-size", type=int, default=64,
                   help="model input (default 64: the tiny model then costs ~0.1 ms an image, far below decoding)")
    p.add_argument("--backbone", default=None,
                   help="a registry backbone instead of the tiny model (e.g. to check the default CPU setup)")
    p.add_argument("--compare-rev", default=BEFORE, help="also run the pool of this commit ('' to skip)")
    p.add_argument("--out-json", default=str(REPO / "bench" / "results" / "decode-pool-cpu.json"))
    p.add_argument("--part", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.part:
        print(json.dumps(run_one(json.loads(args.part))))
        return 0

    from tests.support.helpers import make_tiny_onnx

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    pools = ["this tree"] + ([args.compare_rev] if args.compare_rev else [])
    results, lines, met = {}, [], []
    with tempfile.TemporaryDirectory() as tmp:
        onnx = make_tiny_onnx(Path(tmp) / "tiny.onnx", input_size=args.input_size)
        for scenario in args.scenarios.split(","):
            tree, n, env, what = _scenario_tree(scenario, args, Path(tmp))
            runs: dict[str, list[dict]] = {}
            for r in range(args.rounds):
                for pool in pools:
                    for bs in sizes:
                        cfg = {"pool": pool, "batch_size": bs, "images": str(tree), "onnx": str(onnx), "n": n,
                               "input_size": args.input_size, "workers": args.workers, "threads": args.threads,
                               "backbone": args.backbone, "tmp": tmp}
                        res = _run_fresh(cfg, env)
                        key = f"{pool} · batch {bs}"
                        runs.setdefault(key, []).append(res)
                        print(f"{scenario} round {r + 1}: {key:28s} {res['images_per_second']:7.1f} img/s", flush=True)
            median = {k: statistics.median(x["images_per_second"] for x in v) for k, v in runs.items()}
            ratios = {}
            for pool in pools:
                base = median[f"{pool} · batch {sizes[0]}"]
                for bs in sizes[1:]:
                    ratios[f"{pool}: batch {bs} / batch {sizes[0]}"] = round(median[f"{pool} · batch {bs}"] / base, 3)
            met += [v >= 0.9 for k, v in ratios.items() if k.startswith("this tree")]
            lines += [f"{scenario}: {what}; median img/s of {args.rounds} interleaved rounds"]
            lines += [f"  {k:30s} {v:7.1f}" for k, v in median.items()]
            lines += [f"  {k}: {v:.2f}" for k, v in ratios.items()]
            results[scenario] = {"what": what, "images": n, "median_images_per_second":
                                 {k: round(v, 1) for k, v in median.items()}, "ratios": ratios, "runs": runs}
    print("\n".join(lines))
    result = {
        "benchmark": "decode_pool", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/decode_pool.py"] + (argv if argv is not None else sys.argv[1:])),
        "cpus": len(os.sched_getaffinity(0)), "loadavg_after": list(os.getloadavg()),
        "workers": args.workers, "input_size": args.input_size,
        "model": args.backbone or "tiny ONNX (one 3x3 conv)",
        "target": f"batch {sizes[-1]} >= 0.9 x batch {sizes[0]} (this tree)", "target_met": all(met),
        "scenarios": results, "table": lines,
    }
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
