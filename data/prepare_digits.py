#!/usr/bin/env python3
"""Write a small real image set: scikit-learn's handwritten digits as a class-folder tree of PNG files.

What: ``sklearn.datasets.load_digits`` ships 1,797 real handwritten digits (UCI "Optical Recognition of
Handwritten Digits", 8×8 pixels, 17 grey levels, about 180 per class) inside the package, so this works
offline. The benchmarks of fine-tuning and of the default head (``bench/finetune.py``, ``bench/heads.py``)
use it as their small, hard set: frozen ImageNet vectors of such tiny images plateau well below what a
fine-tuned backbone reaches, the way medical images do.

``--per-class`` images of each digit (deterministic for a given ``--seed``) are upscaled to ``--size``
pixels (bicubic, so strokes stay smooth) and written as ``<out>/<digit>/<digit>_<index>.png``, where
``<index>`` is the image's position in scikit-learn's array. Default: 60 per class, 600 images, 64×64.

Reruns are cheap: a ``.prepared.json`` marker with the same parameters means nothing is written. Images are
written under a temporary name and renamed, the marker last, so a killed run is never mistaken for a
finished one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

MARKER = ".prepared.json"


def prepare(out: str | os.PathLike, *, per_class: int = 60, size: int = 64, seed: int = 0) -> Path:
    """Write the class-folder tree (if not already there with these parameters) and return its path."""
    from PIL import Image
    from sklearn.datasets import load_digits

    out = Path(out)
    params = {"per_class": per_class, "size": size, "seed": seed, "version": 1}
    marker = out / MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == params:
                return out
        except ValueError:
            pass
    digits = load_digits()
    rng = np.random.default_rng(seed)
    for digit in range(10):
        index = np.flatnonzero(digits.target == digit)
        if per_class > len(index):
            raise SystemExit(f"--per-class {per_class}: digit {digit} has only {len(index)} images")
        folder = out / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        for i in sorted(rng.choice(index, per_class, replace=False)):
            pixels = (digits.images[i] * (255 / 16)).round().clip(0, 255).astype(np.uint8)
            image = Image.fromarray(pixels, "L").resize((size, size), Image.BICUBIC)
            path = folder / f"{digit}_{i}.png"
            tmp = folder / f".{path.name}.tmp"
            image.save(tmp, format="PNG")
            os.replace(tmp, path)
    tmp = out / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(params))
    os.replace(tmp, marker)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write (a class-folder tree)")
    parser.add_argument("--per-class", type=int, default=60, help="images per digit (at most ~174; default 60)")
    parser.add_argument("--size", type=int, default=64, help="side of the written PNGs in pixels (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = prepare(args.out, per_class=args.per_class, size=args.size, seed=args.seed)
    print(f"{path}: {10 * args.per_class} digit images in 10 class folders")
    return 0


if __name__ == "__main__":
    sys.exit(main())
