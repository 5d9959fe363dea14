"""A class-folder tree of real images (Animal-MNIST) with known data-quality problems planted in it.

Used by the doctor's tests and its README screenshot: some labels flipped, some images copied byte for byte
under another class (conflicting exact duplicates), and slightly altered copies added (near-duplicates, half
of them under another class). ``DirtySet`` says which paths are which, so a test can score the doctor.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class DirtySet:
    root: Path
    flipped: dict[str, str]  # path as in the shards -> the true class
    exact_copies: list[tuple[str, str]]  # (original, byte-identical copy under another class)
    altered_copies: list[tuple[str, str]]  # (original, slightly altered copy); the copy may sit in another class
    outliers: list[str]  # photographs that are no animal silhouette at all, filed under some class
    classes: list[str]


def _prepare_module():
    path = ROOT / "data" / "prepare_animal_mnist.py"
    spec = importlib.util.spec_from_file_location("_data_script_prepare_animal_mnist", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _alter(img: Image.Image, kind: int) -> Image.Image:
    """A slightly different image: brighter, shifted by a pixel, or through a JPEG round trip."""
    if kind == 0:
        return ImageEnhance.Brightness(img).enhance(1.1)
    if kind == 1:
        return img.transform(img.size, Image.Transform.AFFINE, (1, 0, 1, 0, 1, 0))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return Image.open(io.BytesIO(buf.getvalue())).convert(img.mode)


OUTLIER_PHOTOS = ("coffee", "rocket", "astronaut")  # scikit-image's bundled photographs


def make_dirty_animals(root: Path, per_class: int = 40, classes: int = 10, n_flipped: int = 20,
                       n_exact: int = 6, n_altered: int = 12, n_outliers: int = 3, seed: int = 0) -> DirtySet:
    prep = _prepare_module()
    source = prep.find_source_dir()
    labels = prep.load_array(source / prep.LABEL_FILE)
    names = list(prep.CLASS_NAMES[:classes])
    rng = np.random.default_rng(seed)
    chosen = {c: sorted(rng.choice(np.flatnonzero(labels == k), per_class, replace=False).tolist())
              for k, c in enumerate(names)}
    images = prep.load_images(source / prep.DATA_FILE, len(labels))

    everything = [(c, i) for c in names for i in chosen[c]]
    order = rng.permutation(len(everything))
    flip_set = {everything[j] for j in order[:n_flipped]}
    exact_set = [everything[j] for j in order[n_flipped:n_flipped + n_exact]]
    altered_set = [everything[j] for j in order[n_flipped + n_exact:n_flipped + n_exact + n_altered]]

    def other(c: str) -> str:
        return names[(names.index(c) + 1 + int(rng.integers(len(names) - 1))) % len(names)]

    root.mkdir(parents=True, exist_ok=True)
    for c in names:
        (root / c).mkdir(exist_ok=True)
    flipped, where = {}, {}
    for c, i in everything:
        folder = other(c) if (c, i) in flip_set else c
        rel = f"{folder}/{c}_{i:05d}.png"
        Image.fromarray(images[i]).save(root / rel)
        where[(c, i)] = rel
        if folder != c:
            flipped[rel] = c
    exact = []
    for c, i in exact_set:
        rel = f"{other(c)}/copy_{c}_{i:05d}.png"
        shutil.copyfile(root / where[(c, i)], root / rel)
        exact.append((where[(c, i)], rel))
    altered = []
    for n, (c, i) in enumerate(altered_set):
        folder = other(c) if n % 2 else c
        rel = f"{folder}/altered_{c}_{i:05d}.png"
        _alter(Image.fromarray(images[i]), n % 3).save(root / rel)
        altered.append((where[(c, i)], rel))
    outliers = []
    for name in OUTLIER_PHOTOS[:n_outliers]:
        from skimage import data

        rel = f"{names[int(rng.integers(len(names)))]}/odd_{name}.png"
        Image.fromarray(getattr(data, name)()).convert("L").resize(images.shape[1:][::-1]).save(root / rel)
        outliers.append(rel)
    return DirtySet(root, flipped, exact, altered, outliers, names)
