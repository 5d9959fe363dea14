#!/usr/bin/env python3
"""Generate the stage-1 benchmark images: real photographs as JPEGs at realistic sizes (not committed).

Sources are the colour and grayscale photographs bundled with scikit-image (no download). Every image is a
random crop of one source photo, maybe mirrored, with colour jitter and mild sensor-like noise, saved as a
JPEG at quality 80–95 (one in ten progressive). Two sets, in class-folder layout (class = source photo),
so that ``torchvision.datasets.ImageFolder`` and ``stage1-extract`` read the same tree:

    bench/images/small/<class>/<class>_00000.jpg   about 500×375 (phone-gallery / web size)
    bench/images/large/<class>/<class>_00000.jpg   about 2000×1500 (camera size; sources are upscaled)

Deterministic: image i of a set depends only on (set, i), so N can grow without changing earlier files.
Files that already exist are kept (rerunning is cheap); ``--force`` rewrites them.

    python bench/make_images.py                    # 2000 small + 1000 large
    python bench/make_images.py --small 500 --large 0
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
import zlib
from pathlib import Path

import numpy as np

# class name -> scikit-image loader; grayscale photos are stored as RGB JPEGs (as many real collections do)
SOURCES = {
    "cat": "chelsea",
    "coffee": "coffee",
    "astronaut": "astronaut",
    "rocket": "rocket",
    "tissue": "immunohistochemistry",
    "galaxies": "hubble_deep_field",
    "retina": "retina",
    "cameraman": "camera",
    "coins": "coins",
    "moon": "moon",
    "grass": "grass",
    "brick": "brick",
}
SETS = {"small": (500, 375), "large": (2000, 1500)}
_PHOTOS: dict[str, np.ndarray] = {}


def _photo(cls: str) -> np.ndarray:
    if cls not in _PHOTOS:
        from skimage import data

        arr = np.asarray(getattr(data, SOURCES[cls])())
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        _PHOTOS[cls] = np.ascontiguousarray(arr[..., :3].astype(np.uint8))
    return _PHOTOS[cls]


def _seed(set_name: str, index: int) -> int:
    return zlib.crc32(f"{set_name}:{index}".encode())


def make_one(set_name: str, index: int) -> tuple[str, np.ndarray, int, bool]:
    """Image ``index`` of ``set_name``: (class, RGB pixels, JPEG quality, progressive)."""
    from PIL import Image, ImageEnhance

    rng = np.random.default_rng(_seed(set_name, index))
    classes = sorted(SOURCES)
    cls = classes[index % len(classes)]
    src = _photo(cls)
    h, w = src.shape[:2]
    base_w, base_h = SETS[set_name]
    if rng.random() < 0.2:  # some portrait shots
        base_w, base_h = base_h, base_w
    jitter = rng.uniform(0.9, 1.1)
    out_w, out_h = int(round(base_w * jitter)), int(round(base_h * jitter))
    # crop 35–100 % of the source's area with the output's aspect ratio
    area = rng.uniform(0.35, 1.0)
    aspect = out_w / out_h
    cw = min(w, int(round(np.sqrt(area * w * h * aspect))))
    ch = min(h, int(round(cw / aspect)))
    cw = min(w, int(round(ch * aspect)))
    x = int(rng.integers(0, w - cw + 1))
    y = int(rng.integers(0, h - ch + 1))
    img = Image.fromarray(src[y:y + ch, x:x + cw]).resize((out_w, out_h), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.75, 1.25))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.75, 1.25))
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.7, 1.3))
    arr = np.asarray(img, dtype=np.float32)
    # sensor-like noise: upscaled sources are unrealistically smooth (and would decode unrealistically fast)
    noise_sigma = rng.uniform(2.0, 5.0)
    arr = arr + rng.normal(0.0, noise_sigma, size=arr.shape).astype(np.float32)
    pixels = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    quality = int(rng.integers(80, 96))
    progressive = bool(rng.random() < 0.1)
    return cls, pixels, quality, progressive


def _write(args: tuple[Path, str, int, bool]) -> int:
    from PIL import Image

    root, set_name, index, force = args
    cls = sorted(SOURCES)[index % len(SOURCES)]
    path = root / set_name / cls / f"{cls}_{index:05d}.jpg"
    if path.exists() and not force:
        return 0
    cls, pixels, quality, progressive = make_one(set_name, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    Image.fromarray(pixels).save(tmp, "JPEG", quality=quality, progressive=progressive, optimize=progressive)
    os.replace(tmp, path)
    return 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "images"))
    p.add_argument("--small", type=int, default=2000, help="number of ~500×375 images (default 2000)")
    p.add_argument("--large", type=int, default=1000, help="number of ~2000×1500 images (default 1000)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--force", action="store_true", help="rewrite files that already exist")
    args = p.parse_args(argv)
    root = Path(args.out)
    tasks = [(root, "small", i, args.force) for i in range(args.small)]
    tasks += [(root, "large", i, args.force) for i in range(args.large)]
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        written = sum(pool.imap_unordered(_write, tasks, chunksize=8))
    # remove images beyond N from an earlier, larger run, so the set is exactly what was asked for
    removed = 0
    for set_name, n in (("small", args.small), ("large", args.large)):
        for f in (root / set_name).glob("*/*.jpg") if (root / set_name).is_dir() else []:
            if int(f.stem.rsplit("_", 1)[1]) >= n:
                f.unlink()
                removed += 1
    sizes = {s: sum(f.stat().st_size for f in (root / s).glob("*/*.jpg")) for s in SETS if (root / s).is_dir()}
    print(f"{root}: wrote {written} images, removed {removed}, kept the rest "
          f"({time.perf_counter() - t0:.1f}s); "
          + ", ".join(f"{s}: {sz / 2**20:.0f} MiB" for s, sz in sizes.items()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
