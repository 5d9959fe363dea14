#!/usr/bin/env python3
"""Stage-1 benchmark: the project against the machine's ceilings and the naive torch baseline, in one run.

On the same images, backbone, provider, precision and batch size, measures images/s for:

1. decode ceiling  — read + decode + resize + centre crop (``decode_image``), no model, a process per core;
2. model ceiling   — the ONNX session alone (``FeatureSession.run``) on pre-decoded uint8 batches;
3. naive baseline  — torchvision ``ImageFolder`` + ``DataLoader`` (as many workers as the project's decode
                     workers) feeding the torch model in eager mode under ``torch.no_grad()``;
4. project         — ``stage1-extract`` end to end, images on disk → Parquet shards, in a fresh process,
                     with the peak memory of its whole process tree (decode workers included).

With ``--decode gpu`` two more, in the same run: the GPU decode ceiling (the project's GPU decoder alone —
read, hardware JPEG decode, resize and crop on the device — batches left on the GPU) and the project with
``--decode gpu``; the GPU's model is recorded. ``--decode nvimgcodec-cpu`` runs the same code on the CPU.

Every part runs in its own fresh Python process, one after the other, so none inherits another's threads,
caches or memory. Ceilings and baseline are timed in steady state (after a warm-up, for ``--seconds``);
the project's figure is its own end-to-end loop time (decode-pool start, every batch, the final shard
write), so the ratios are, if anything, conservative. Page caches are warmed first: this measures compute,
not the disk.

    python bench/make_images.py                  # once: bench/images/{small,large}
    python bench/stage1.py                       # CPU, default backbone, both sets
    python bench/stage1.py --memory-check        # + peak memory at 1× and 4× the images
    python bench/stage1.py --provider cuda --backbone resnet50 --precision fp16 --batch-size 256
    python bench/stage1.py --provider cuda --backbone resnet50 --precision fp16 --decode gpu
    python bench/stage1.py --quick               # a smoke run: 200 images a set, 2 s a measure, no baseline

Combined ceiling: on the CPU provider decode and model share the same cores, so the best any pipeline can
do is 1/(1/decode + 1/model); on a GPU they run on different hardware, so it is min(decode, model).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
TARGETS = {"cpu": {"project/combined": 0.85, "project/naive": 1.5},
           "gpu": {"project/combined": 0.90}}
#: with a GPU decoder: its ceiling against 16 PIL processes (small set only), and the project against it
GPU_DECODE_TARGETS = {"gpu_decode/decode": (1.5, ("small",)), "project_gpu/combined_gpu": (0.90, None)}
#: --sweep-cuda-options: the model ceiling under each CUDA provider setting, to keep only what pays
CUDA_SWEEP = {"ORT defaults (NCHW)": {"prefer_nhwc": False},
              "project default (NHWC)": {},
              "NHWC, heuristic search": {"conv_algo_search": "HEURISTIC"},
              "NHWC, no max workspace": {"max_workspace": False},
              "NHWC, CUDA graph": {"cuda_graph": True}}
#: the project's session alone, ResNet-50 fp16 batch 256 (issue 17), by GPU model
MODEL_TARGETS = {"H200": 11000.0, "H100": 9500.0}


# ----------------------------------------------------------------------------------------------- helpers

def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


def list_class_tree(root: Path) -> list[tuple[str, str]]:
    """(path, class) for every image in a class-folder tree, sorted (the order ImageFolder uses)."""
    out = []
    for cls in sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        for f in sorted((root / cls).iterdir()):
            if f.suffix.lower() in IMAGE_EXTS and not f.name.startswith("."):
                out.append((str(f), cls))
    return out


def discover_sets(images: Path) -> list[tuple[str, Path]]:
    """``images`` itself when it is a class-folder tree, else its subfolders that are (e.g. small/, large/)."""
    subs = sorted(d for d in images.iterdir() if d.is_dir() and not d.name.startswith("."))
    if subs and all(any(f.suffix.lower() in IMAGE_EXTS for f in d.iterdir() if f.is_file()) for d in subs):
        return [(images.name, images)]
    sets = [(d.name, d) for d in subs if list_class_tree(d)]
    order = {"small": 0, "large": 1}
    return sorted(sets, key=lambda s: (order.get(s[0], 2), s[0]))


def warm_page_cache(paths: list[str]) -> int:
    total = 0
    for p in paths:
        with open(p, "rb") as fh:
            total += len(fh.read())
    return total


def machine() -> dict:
    info = {"platform": platform.platform(), "machine": platform.machine(), "cpus": cpu_count()}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as fh:
            info["memory_gib"] = round(int(fh.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if gpu.returncode == 0 and gpu.stdout.strip():
            info["gpu"] = gpu.stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def git_describe() -> str | None:
    """The commit measured, with ``-dirty`` when stage 1's code has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno", "--", "stage1_extract", "shardformat"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (head + ("-dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


# ------------------------------------------------------------------------------- parts (fresh processes)

_PREPS: dict = {}


def _decode_task(args):
    path, prep_dict, draft = args
    from stage1_extract.decoding.image import decode_image
    from stage1_extract.model.preprocessing import Preprocessing

    key = json.dumps(prep_dict, sort_keys=True)
    prep = _PREPS.get(key) or _PREPS.setdefault(key, Preprocessing.from_dict(prep_dict))
    with open(path, "rb") as fh:
        data = fh.read()
    return int(decode_image(data, prep, draft=draft)[0, 0, 0])


def part_decode(cfg: dict) -> dict:
    """Decode ceiling: every core decodes (read + decode + resize + crop), nothing else."""
    import multiprocessing as mp

    files = [p for p, _ in cfg["files"]]
    procs = cfg.get("decode_processes") or cpu_count()
    tasks = [(p, cfg["prep"], cfg["draft"]) for p in files]
    with mp.get_context("spawn").Pool(procs) as pool:
        pool.map(_decode_task, tasks[: procs * 4], chunksize=1)  # warm-up: imports, first calls
        n, t0 = 0, time.perf_counter()
        while True:
            for _ in pool.imap_unordered(_decode_task, tasks, chunksize=8):
                n += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= cfg["seconds"]:
                break
    return {"images_per_second": n / elapsed, "images": n, "seconds": elapsed, "processes": procs}


def part_model(cfg: dict) -> dict:
    """Model ceiling: the ONNX session alone on pre-decoded uint8 batches of the set's own images."""
    import numpy as np

    from stage1_extract.decoding.image import decode_image
    from stage1_extract.model.preprocessing import Preprocessing
    from stage1_extract.runtime.session import FeatureSession

    prep = Preprocessing.from_dict(cfg["prep"])
    bs = cfg["batch_size"]
    files = [p for p, _ in cfg["files"]][: bs]
    batch = np.stack([decode_image(open(p, "rb").read(), prep, draft=cfg["draft"]) for p in files])
    if len(batch) < bs:  # fewer images than a batch: repeat them
        batch = np.concatenate([batch] * (bs // len(batch) + 1))[:bs]
    from stage1_extract.runtime.inference import OverlappedInference

    from stage1_extract.runtime.session import CudaOptions

    session = FeatureSession(cfg["onnx_path"], provider=cfg["provider"], batch_size=bs,
                             input_size=prep.input_size, threads=cfg.get("model_threads"),
                             precision=cfg["precision"], cuda=CudaOptions(**cfg.get("cuda_options", {})))
    # as the project runs it: host batches staged and copied while the previous one runs (CPU: synchronous)
    with OverlappedInference(session) as infer:
        for _ in range(3):
            infer.submit(batch, bs, None)
        list(infer.drain())
        n, t0 = 0, time.perf_counter()
        while True:
            infer.submit(batch, bs, None)
            for _, feats in infer.ready():
                n += bs
            elapsed = time.perf_counter() - t0
            if elapsed >= cfg["seconds"]:
                break
        for _, feats in infer.drain():
            n += bs
        elapsed = time.perf_counter() - t0
    assert feats.shape == (bs, cfg["feature_dim"]), feats.shape
    return {"images_per_second": n / elapsed, "images": n, "seconds": elapsed, "provider": session.provider,
            "threads": cfg.get("model_threads") or cpu_count(), "overlapped": infer.overlapped}


def part_gpu_decode(cfg: dict) -> dict:
    """GPU decode ceiling: the project's GPU decoder alone over the set (batches stay on the device)."""
    import torch

    from stage1_extract.decoding.factory import make_decoder as _decoder
    from stage1_extract.model.preprocessing import Preprocessing

    prep = Preprocessing.from_dict(cfg["prep"])
    files = [p for p, _ in cfg["files"]]
    bs = cfg["batch_size"]
    on_gpu = cfg["decode"] == "gpu"
    with _decoder(cfg["decode"], prep, bs, cfg["workers"], cfg["draft"]) as dec:
        for _ in dec.run(files[: bs * 2]):  # warm-up: decoder start, kernels, allocator
            pass
        n, t0 = 0, time.perf_counter()
        while True:
            for batch in dec.run(files):
                n += sum(it.row >= 0 for it in batch.items)
            if on_gpu:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            if elapsed >= cfg["seconds"]:
                break
    return {"images_per_second": n / elapsed, "images": n, "seconds": elapsed, "decoder": type(dec).__name__,
            "io_threads": cfg["workers"], "gpu": torch.cuda.get_device_name() if on_gpu else None}


def part_naive(cfg: dict) -> dict:
    """Naive baseline: ImageFolder + DataLoader + the torch model in eager mode, as most people write it."""
    import torch
    import torchvision.transforms as T
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from stage1_extract.model.registry import get_backbone
    from stage1_extract.model.weights import build_feature_model, weights_source
    from stage1_extract.model.preprocessing import Preprocessing

    spec = get_backbone(cfg["backbone"])
    prep = Preprocessing.from_dict(cfg["prep"])
    interp = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
              "nearest": T.InterpolationMode.NEAREST, "lanczos": T.InterpolationMode.LANCZOS}[prep.interpolation]
    transform = T.Compose([
        T.Resize(prep.resize, interpolation=interp),
        T.CenterCrop(prep.input_size),
        T.ToTensor(),
        T.Normalize([m / 255 for m in prep.mean], [s / 255 for s in prep.std]),
    ])
    dataset = ImageFolder(cfg["set_dir"], transform=transform)
    cuda = cfg["provider"] in ("cuda", "tensorrt")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cfg["precision"] == "fp16" and cuda else torch.float32
    model = build_feature_model(spec, weights_source(spec, cfg.get("weights")).load_state_dict())
    model = model.to(device=device, dtype=dtype).eval()
    loader = DataLoader(dataset, batch_size=cfg["batch_size"], shuffle=False, num_workers=cfg["workers"],
                        pin_memory=cuda)
    n = 0
    t0 = None
    with torch.no_grad():
        while True:
            for x, _ in loader:
                feats = model(x.to(device, non_blocking=True).to(dtype)).float().cpu().numpy()
                if t0 is None:  # the first batch is the warm-up (worker start, first inference)
                    t0 = time.perf_counter()
                    continue
                n += len(x)
                if time.perf_counter() - t0 >= cfg["seconds"]:
                    break
            elapsed = time.perf_counter() - t0
            if elapsed >= cfg["seconds"]:
                break
    assert feats.shape[1] == cfg["feature_dim"], feats.shape
    return {"images_per_second": n / elapsed, "images": n, "seconds": elapsed, "device": str(device),
            "dtype": str(dtype).replace("torch.", ""), "torch_threads": torch.get_num_threads(),
            "workers": cfg["workers"]}


def part_prepare(cfg: dict) -> dict:
    """Export (or find in the cache) the ONNX model, and resolve the project's defaults for this provider."""
    from stage1_extract.engines.local import default_workers
    from stage1_extract.model.export import prepare_model
    from stage1_extract.run.lifecycle import versions as _versions
    from stage1_extract.run.lifecycle import default_batch_size
    from stage1_extract.runtime.session import wants_gpu

    model = prepare_model(cfg["backbone"], weights=cfg.get("weights"), precision=cfg["precision"])
    on_gpu = wants_gpu(cfg["provider"])
    return {"onnx_path": model.onnx_path, "prep": model.preprocessing.to_dict(), "feature_dim": model.feature_dim,
            "on_gpu": on_gpu, "default_workers": default_workers(on_gpu),
            "default_batch_size": default_batch_size(on_gpu), "versions": _versions()}


PARTS = {"decode": part_decode, "model": part_model, "naive": part_naive, "prepare": part_prepare,
         "gpu_decode": part_gpu_decode}


def run_part(name: str, cfg: dict) -> dict:
    """Run one part in a fresh interpreter; its result is the JSON on its last stdout line."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(cfg, fh)
        cfg_path = fh.name
    try:
        load = loadavg()
        proc = subprocess.run([sys.executable, __file__, "--part", name, "--part-config", cfg_path],
                              capture_output=True, text=True)
    finally:
        os.unlink(cfg_path)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"part {name} failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["loadavg_before"] = load
    return result


# ------------------------------------------------------------------------------------------------ project

def run_project(set_dir: Path, cfg: dict, out_dir: Path, decode: str = "cpu") -> dict:
    """``stage1-extract`` end to end in a fresh process, with the peak memory of its process tree."""
    from memory import run_measured

    cmd = [sys.executable, "-m", "stage1_extract", "--images", str(set_dir), "--out", str(out_dir),
           "--backbone", cfg["backbone"], "--provider", cfg["provider"], "--precision", cfg["precision"],
           "--batch-size", str(cfg["batch_size"]), "--workers", str(cfg["workers"]), "--json", "--no-progress",
           "--decode", decode]
    if cfg.get("threads"):
        cmd += ["--threads", str(cfg["threads"])]
    if cfg["draft"]:
        cmd.append("--draft")
    if cfg.get("weights"):
        cmd += ["--weights", cfg["weights"]]
    load = loadavg()
    run = run_measured(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=str(REPO))
    if run.returncode != 0:
        raise RuntimeError(f"stage1-extract failed ({run.returncode}):\n{run.stderr[-4000:]}")
    summary = json.loads(run.stdout[run.stdout.index("{"):])
    if summary["errors"]:
        raise RuntimeError(f"stage1-extract reported {summary['errors']} errors on the bench images")
    return {
        "images_per_second": summary["images_per_second"],
        "images": summary["extracted"],
        "seconds": summary["seconds"],
        "process_wall_seconds": round(run.wall_seconds, 3),
        "images_per_second_incl_startup": summary["extracted"] / run.wall_seconds,
        "timings": summary["timings"],
        "provider": summary["provider"],
        "memory": run.memory(),
        "loadavg_before": load,
    }


def memory_check(set_dir: Path, cfg: dict, tmp: Path, factors=(1, 4)) -> dict:
    """Peak memory of the project at 1× and 4× the images (hard links under new names, so no extra disk)."""
    files = list_class_tree(set_dir)
    out = {}
    for k in factors:
        tree = tmp / f"mem-{k}x"
        for path, cls in files:
            (tree / cls).mkdir(parents=True, exist_ok=True)
            for copy in range(k):
                dst = tree / cls / f"c{copy}_{Path(path).name}"
                try:
                    os.link(path, dst)
                except OSError:
                    shutil.copyfile(path, dst)
        res = run_project(tree, cfg, tmp / f"mem-out-{k}x")
        out[f"{k}x"] = {"images": res["images"], "images_per_second": round(res["images_per_second"], 1),
                        **res["memory"]}
        shutil.rmtree(tree)
        shutil.rmtree(tmp / f"mem-out-{k}x")
    lo, hi = out[f"{factors[0]}x"], out[f"{factors[-1]}x"]
    out["pss_ratio"] = round(hi["peak_pss_mib"] / lo["peak_pss_mib"], 3)
    out["max_process_rss_ratio"] = round(hi["max_process_rss_mib"] / lo["max_process_rss_mib"], 3)
    return out


# ------------------------------------------------------------------------------------------------- report

def ratios(r: dict, on_gpu: bool) -> dict:
    dec, mod = r["decode"]["images_per_second"], r["model"]["images_per_second"]
    combined = min(dec, mod) if on_gpu else 1 / (1 / dec + 1 / mod)
    proj = r["project"]["images_per_second"]
    out = {"combined_ceiling": combined, "combined_rule": "min(decode, model)" if on_gpu else "1/(1/decode+1/model)",
           "project/model": proj / mod, "project/naive": proj / r["naive"]["images_per_second"],
           "project/combined": proj / combined, "project/decode": proj / dec}
    if "gpu_decode" in r:
        gdec = r["gpu_decode"]["images_per_second"]
        # the GPU decoder shares the GPU with the model, but neither is bound by the other's resources
        combined_gpu = min(gdec, mod) if on_gpu else 1 / (1 / gdec + 1 / mod)
        out |= {"combined_gpu_ceiling": combined_gpu, "gpu_decode/decode": gdec / dec,
                "project_gpu/combined_gpu": r["project_gpu"]["images_per_second"] / combined_gpu}
    return out


def table(results: dict, on_gpu: bool) -> str:
    lines = []
    for set_name, r in results.items():
        q = r["ratios"]
        lines += [
            f"set {set_name}: {r['images']} images ({r['mean_file_kib']:.0f} KiB mean JPEG)",
            f"  {'measure':34s} {'img/s':>9s}",
            f"  {'1 decode ceiling (' + str(r['decode']['processes']) + ' procs)':34s} "
            f"{r['decode']['images_per_second']:9.1f}",
            f"  {'2 model ceiling (ONNX Runtime)':34s} {r['model']['images_per_second']:9.1f}",
            f"  {'  combined ceiling ' + ('min' if on_gpu else '1/(1/d+1/m)'):34s} {q['combined_ceiling']:9.1f}",
            f"  {'3 naive torch DataLoader+eager':34s} {r['naive']['images_per_second']:9.1f}",
            f"  {'4 project stage1-extract':34s} {r['project']['images_per_second']:9.1f}"
            f"   (incl. process start {r['project']['images_per_second_incl_startup']:.1f})",
            f"  ratios: project/model {q['project/model']:.2f} · project/naive {q['project/naive']:.2f}× · "
            f"project/combined {q['project/combined']:.2f}",
        ]
        if "gpu_decode" in r:
            lines += [
                f"  {'5 GPU decode ceiling':34s} {r['gpu_decode']['images_per_second']:9.1f}"
                f"   ({r['gpu_decode']['decoder']}{', ' + r['gpu_decode']['gpu'] if r['gpu_decode']['gpu'] else ''})",
                f"  {'  combined GPU-decode ceiling':34s} {q['combined_gpu_ceiling']:9.1f}",
                f"  {'6 project, GPU decoding':34s} {r['project_gpu']['images_per_second']:9.1f}",
                f"  ratios: GPU decode/CPU decode {q['gpu_decode/decode']:.2f}× · "
                f"project (GPU decode)/combined {q['project_gpu/combined_gpu']:.2f}",
            ]
        for label, ips in r.get("cuda_options", {}).items():
            lines.append(f"  {'  model, ' + label:34s} {ips:9.1f}")
        lines += [
            f"  project peak memory: {r['project']['memory']['peak_pss_mib']:.0f} MiB PSS over "
            f"{r['project']['memory']['peak_processes']} processes "
            f"(largest process {r['project']['memory']['max_process_rss_mib']:.0f} MiB RSS)",
        ]
    return "\n".join(lines)


def check_targets(results: dict, on_gpu: bool, model_target: float | None = None) -> dict:
    targets = TARGETS["gpu" if on_gpu else "cpu"]
    out = {}
    for set_name, r in results.items():
        out[set_name] = {k: {"target": v, "measured": round(r["ratios"][k], 3), "met": r["ratios"][k] >= v}
                         for k, v in targets.items()}
        if "gpu_decode" in r:
            for k, (v, sets) in GPU_DECODE_TARGETS.items():
                if sets is None or set_name in sets:
                    out[set_name][k] = {"target": v, "measured": round(r["ratios"][k], 3), "met": r["ratios"][k] >= v}
        if model_target:
            ips = r["model"]["images_per_second"]
            out[set_name]["model img/s"] = {"target": model_target, "measured": round(ips, 1), "met": ips >= model_target}
    return out


def gpu_model_target(info: dict, args) -> float | None:
    """Issue 17's model-ceiling target when this run is the one it names (ResNet-50 fp16, batch 256, H100/H200)."""
    if not (args.provider in ("cuda", "tensorrt") and args.backbone == "resnet50" and args.precision == "fp16"):
        return None
    names = " ".join(info.get("gpu", []))
    return next((v for k, v in MODEL_TARGETS.items() if k in names), None)


def subset_tree(set_dir: Path, files: list, tmp: Path) -> Path:
    """The first images of a set as a tree of hard links (``--limit``), so the project sees only them."""
    tree = tmp / f"subset-{set_dir.name}"
    for path, cls in files:
        (tree / cls).mkdir(parents=True, exist_ok=True)
        dst = tree / cls / Path(path).name
        try:
            os.link(path, dst)
        except OSError:
            shutil.copyfile(path, dst)
    return tree


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--images", default=str(Path(__file__).parent / "images"),
                   help="a class-folder tree, or a folder of such trees (default bench/images: small/ and large/)")
    p.add_argument("--sets", default=None, help="comma-separated subset of the sets found under --images")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", default=None, help="state_dict file for the backbone (offline torchvision models)")
    p.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default="cpu")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--batch-size", type=int, default=None, help="default: the project's (16 CPU, 256 GPU)")
    p.add_argument("--workers", type=int, default=None,
                   help="decode workers for the project, and DataLoader workers for the baseline (default: project's)")
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads for the project (default: project's)")
    p.add_argument("--seconds", type=float, default=15.0, help="steady-state time per ceiling/baseline measure")
    p.add_argument("--draft", action="store_true", help="JPEG draft decoding (decode ceiling and project)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat every measure N times, interleaved, and keep each one's best (noisy shared machines)")
    p.add_argument("--skip-naive", action="store_true", help="skip the (slow) torch baseline")
    p.add_argument("--decode", choices=["cpu", "gpu", "nvimgcodec-cpu"], default="cpu",
                   help="gpu: also the GPU decode ceiling and the project with --decode gpu, in the same run "
                   "(nvimgcodec-cpu: the same code on the CPU, to check the harness)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images of each set")
    p.add_argument("--sweep-cuda-options", action="store_true",
                   help="--provider cuda: also the model ceiling under each CUDA provider setting (first set)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: --limit 200 --seconds 2 --skip-naive, result under the system's temp folder")
    p.add_argument("--memory-check", action="store_true", help="also run the project on 1× and 4× the first set")
    p.add_argument("--out-json", default=None, help="default bench/results/stage1-<provider>-<backbone>[-draft].json")
    p.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    p.add_argument("--part-config", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.part:  # a child process measuring one thing
        cfg = json.loads(Path(args.part_config).read_text())
        print(json.dumps(PARTS[args.part](cfg)))
        return 0

    if args.quick:
        args.limit, args.seconds, args.skip_naive = args.limit or 200, min(args.seconds, 2.0), True
    images = Path(args.images)
    if not images.is_dir():
        p.error(f"--images {images}: not a folder (make one with: python bench/make_images.py)")
    sets = discover_sets(images)
    if args.sets:
        wanted = args.sets.split(",")
        sets = [s for s in sets if s[0] in wanted]
    if not sets:
        p.error(f"no class-folder image trees under {images}")

    base = {"backbone": args.backbone, "weights": args.weights, "provider": args.provider,
            "precision": args.precision, "draft": args.draft, "seconds": args.seconds}
    t_start = time.perf_counter()
    prepared = run_part("prepare", base)
    on_gpu = args.provider in ("cuda", "tensorrt")
    bs = args.batch_size or prepared["default_batch_size"]
    workers = args.workers or prepared["default_workers"]
    cfg = {**base, "onnx_path": prepared["onnx_path"], "prep": prepared["prep"],
           "feature_dim": prepared["feature_dim"], "batch_size": bs, "workers": workers, "threads": args.threads}
    print(f"{args.backbone} {args.precision} on {args.provider}, batch {bs}, {workers} decode workers, "
          f"ORT threads {args.threads or 'project default'}, draft {args.draft}; load {loadavg()}", file=sys.stderr)

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-stage1-") as tmp:
        tmp = Path(tmp)
        for set_name, set_dir in sets:
            files = list_class_tree(set_dir)
            if args.limit and len(files) > args.limit:
                files = files[:: -(-len(files) // args.limit)][: args.limit]  # spread over the classes
                set_dir = subset_tree(set_dir, files, tmp)
                files = list_class_tree(set_dir)
            nbytes = warm_page_cache([f for f, _ in files])
            scfg = {**cfg, "files": files, "set_dir": str(set_dir)}
            r = {"images": len(files), "mean_file_kib": nbytes / len(files) / 1024, "dir": str(set_dir)}
            rounds = []
            for k in range(args.rounds):
                tag = f"[{set_name}{f' round {k + 1}/{args.rounds}' if args.rounds > 1 else ''}]"
                one = {}
                print(f"{tag} {len(files)} images: decode ceiling ...", file=sys.stderr)
                one["decode"] = run_part("decode", scfg)
                print(f"{tag} model ceiling ...", file=sys.stderr)
                one["model"] = run_part("model", scfg)
                if args.skip_naive:
                    one["naive"] = {"images_per_second": float("nan"), "skipped": True}
                else:
                    print(f"{tag} naive baseline ...", file=sys.stderr)
                    one["naive"] = run_part("naive", scfg)
                print(f"{tag} project ...", file=sys.stderr)
                one["project"] = run_project(set_dir, cfg, tmp / f"out-{set_name}")
                shutil.rmtree(tmp / f"out-{set_name}", ignore_errors=True)
                if args.decode != "cpu":
                    print(f"{tag} GPU decode ceiling ({args.decode}) ...", file=sys.stderr)
                    one["gpu_decode"] = run_part("gpu_decode", {**scfg, "decode": args.decode})
                    print(f"{tag} project --decode {args.decode} ...", file=sys.stderr)
                    one["project_gpu"] = run_project(set_dir, cfg, tmp / f"out-{set_name}", decode=args.decode)
                    shutil.rmtree(tmp / f"out-{set_name}", ignore_errors=True)
                one["ratios"] = ratios(one, on_gpu)
                rounds.append(one)
            measures = ("decode", "model", "naive", "project") + (("gpu_decode", "project_gpu")
                                                                   if args.decode != "cpu" else ())
            for key in measures:  # best of the rounds: interference only slows
                r[key] = max(rounds, key=lambda one: one[key]["images_per_second"])[key]
            if args.rounds > 1:
                r["rounds"] = [{k: one[k]["images_per_second"] for k in measures}
                               | {"project/combined": one["ratios"]["project/combined"]} for one in rounds]
            r["ratios"] = ratios(r, on_gpu)
            if args.sweep_cuda_options and args.provider == "cuda" and not results:
                r["cuda_options"] = {}
                for label, options in CUDA_SWEEP.items():
                    print(f"[{set_name}] model ceiling, CUDA options {label} ...", file=sys.stderr)
                    r["cuda_options"][label] = run_part("model", {**scfg, "cuda_options": options})["images_per_second"]
            results[set_name] = r
        memory = None
        if args.memory_check:
            set_name, set_dir = sets[0]
            print(f"[{set_name}] memory check: project at 1× and 4× the images ...", file=sys.stderr)
            memory = {"set": set_name, **memory_check(set_dir, cfg, tmp)}

    text = table(results, on_gpu)
    info = machine()
    targets = check_targets(results, on_gpu, gpu_model_target(info, args))
    print(text)
    for set_name, t in targets.items():
        print(f"targets [{set_name}]: " + "; ".join(
            f"{k} {v['measured']:.2f} (≥{v['target']}: {'met' if v['met'] else 'NOT met'})" for k, v in t.items()))
    if memory:
        print(f"memory [{memory['set']}]: 1× {memory['1x']['images']} images {memory['1x']['peak_pss_mib']:.0f} MiB PSS, "
              f"4× {memory['4x']['images']} images {memory['4x']['peak_pss_mib']:.0f} MiB PSS "
              f"(ratio {memory['pss_ratio']:.2f}; largest process {memory['1x']['max_process_rss_mib']:.0f} → "
              f"{memory['4x']['max_process_rss_mib']:.0f} MiB)")

    def rounded(x):
        if isinstance(x, float):
            return round(x, 3) if x == x else None  # NaN (a skipped measure) → null
        if isinstance(x, dict):
            return {k: rounded(v) for k, v in x.items()}
        if isinstance(x, list):
            return [rounded(v) for v in x]
        return x

    doc = {
        "benchmark": "stage1",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "bench/stage1.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": info,
        "gpu_model": (info.get("gpu") or [None])[0],
        "backbone": args.backbone, "provider": args.provider, "precision": args.precision, "batch_size": bs,
        "decode": args.decode, "limit": args.limit,
        "decode_workers": workers, "ort_threads": args.threads or "project default (all cores)",
        "draft": args.draft, "seconds_per_measure": args.seconds,
        "versions": prepared["versions"],
        "git": git_describe(),
        "sets": rounded(results),
        "targets": targets,
        "memory_check": memory,
        "loadavg_after": loadavg(),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "table": text.splitlines(),
    }
    name = f"stage1-{args.provider}-{args.backbone}{'-draft' if args.draft else ''}" \
           f"{'' if args.decode == 'cpu' else '-decode-' + args.decode}.json"
    # a quick run is a smoke test: it never replaces a committed result
    results_dir = Path(tempfile.gettempdir()) / "bench-stage1-quick" if args.quick else REPO / "bench" / "results"
    out_json = Path(args.out_json or results_dir / name)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out_json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as exc:  # a part failed: its own error message, without the harness's traceback
        print(f"bench/stage1.py: {str(exc).strip().splitlines()[-1]}", file=sys.stderr)
        sys.exit(1)
