#!/usr/bin/env python3
"""Convert a downloaded MedMNIST ``.npz`` file into a class-folder tree of PNG files plus ``split.csv``.

What: MedMNIST (https://medmnist.com) distributes each 2-D data set as one ``.npz`` archive (for example
``pathmnist.npz``, ``bloodmnist.npz``, or ``pathmnist_64.npz`` for the larger sizes) holding::

    train_images  uint8 (N, H, W) grayscale or (N, H, W, 3) RGB      train_labels  int (N, 1)
    val_images    …                                                  val_labels    …
    test_images   …                                                  test_labels   …

This script writes the images as ``OUT/<class name>/<split>_<index>.png`` — the same layout as users'
own data and the Animal-MNIST demo, so the pipeline can read it with ``--images OUT`` — and a
``split.csv`` with columns ``path,label,split`` (path relative to the CSV's folder, label = class folder
name) so the official train/val/test split is not lost. Stage 1 also accepts that CSV directly as a
file list (``--images OUT/split.csv``); with ``--images OUT`` it just reports split.csv as a skipped file.

Why a converter and not a loader: the pipeline's input is image files, whatever their origin; turning
the archive into files once keeps every later stage unaware of MedMNIST.

Class names: built in for the single-label 2-D sets whose label lists are published in MedMNIST's own
``INFO`` table (PathMNIST, DermaMNIST, OCTMNIST, PneumoniaMNIST, RetinaMNIST, BreastMNIST, BloodMNIST,
TissueMNIST, OrganA/C/SMNIST), chosen from the file name (``--dataset`` overrides) and written as
folder-safe short forms; ``--class-names`` gives your own; otherwise folders are ``class_0, class_1, …``.
ChestMNIST (multi-label) and the 3-D sets cannot be expressed as class folders and are refused.

The archive is opened with ``np.load(path, allow_pickle=False)``: an ``.npz`` that needs pickle to load
is refused rather than trusted. Images are written through a hidden temporary file and a rename, and
``split.csv`` is written last, so an interrupted conversion never leaves a half-written file.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")

_ORGAN = ("bladder", "femur_left", "femur_right", "heart", "kidney_left", "kidney_right", "liver",
          "lung_left", "lung_right", "pancreas", "spleen")
# Label index -> folder name, from MedMNIST v2's INFO table (medmnist/info.py), shortened to be folder-safe.
KNOWN_CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "pathmnist": ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth_muscle",
                  "normal_colon_mucosa", "cancer_associated_stroma", "colorectal_adenocarcinoma_epithelium"),
    "dermamnist": ("actinic_keratoses_and_intraepithelial_carcinoma", "basal_cell_carcinoma",
                   "benign_keratosis_like_lesions", "dermatofibroma", "melanoma", "melanocytic_nevi",
                   "vascular_lesions"),
    "octmnist": ("choroidal_neovascularization", "diabetic_macular_edema", "drusen", "normal"),
    "pneumoniamnist": ("normal", "pneumonia"),
    "retinamnist": ("grade_0", "grade_1", "grade_2", "grade_3", "grade_4"),  # ordinal DR severity grades
    "breastmnist": ("malignant", "normal_or_benign"),
    "bloodmnist": ("basophil", "eosinophil", "erythroblast", "immature_granulocytes", "lymphocyte",
                   "monocyte", "neutrophil", "platelet"),
    "tissuemnist": ("collecting_duct_connecting_tubule", "distal_convoluted_tubule",
                    "glomerular_endothelial_cells", "interstitial_endothelial_cells", "leukocytes", "podocytes",
                    "proximal_tubule_segments", "thick_ascending_limb"),
    "organamnist": _ORGAN,
    "organcmnist": _ORGAN,
    "organsmnist": _ORGAN,
}
UNSUPPORTED = {
    "chestmnist": "ChestMNIST is multi-label (14 findings per image); it has no single class per image",
}
_TMP_SUFFIX = ".tmp"


class ConversionError(ValueError):
    """A problem with the input or the options, worded for the user."""


def dataset_key(path: str | os.PathLike) -> str | None:
    """``pathmnist`` for ``pathmnist.npz`` / ``PathMNIST_64.npz``; None if the name is not ``*mnist``."""
    m = re.fullmatch(r"([a-z0-9]+mnist(?:3d)?)(?:_\d+)?", Path(path).stem.lower())
    return m.group(1) if m else None


def _check_names(names: list[str], where: str) -> list[str]:
    names = [n.strip() for n in names]
    for n in names:
        if not n or n in (".", "..") or n.startswith(".") or "/" in n or "\\" in n or "\0" in n:
            raise ConversionError(f"{where}: {n!r} cannot be a folder name (empty, hidden, or has a path separator)")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConversionError(f"{where}: duplicate class name(s): {', '.join(dup)}")
    return names


def _open_npz(path: Path):
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise ConversionError(f"{path}: cannot read as a NumPy .npz archive: {exc}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ConversionError(f"{path}: is a single .npy array, not an .npz archive with *_images/*_labels keys")
    return data


def _get(data, path: Path, key: str) -> np.ndarray:
    try:
        return data[key]
    except ValueError as exc:  # object arrays need pickle
        raise ConversionError(f"{path}: array {key!r} cannot be loaded without pickle ({exc}); refused") from None


def load_split(data, path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(images, labels)`` of one split: images uint8 (N,H,W) or (N,H,W,3), labels int (N,)."""
    keys = [f"{split}_images", f"{split}_labels"]
    missing = [k for k in keys if k not in data.files]
    if missing:
        raise ConversionError(
            f"{path}: missing key(s) {', '.join(repr(k) for k in missing)} for split {split!r} "
            f"(the file has: {', '.join(sorted(data.files)) or 'nothing'}); "
            "a MedMNIST .npz has train/val/test_images and train/val/test_labels — choose splits with --splits"
        )
    images, labels = _get(data, path, keys[0]), _get(data, path, keys[1])
    if images.dtype != np.uint8:
        raise ConversionError(f"{path}: {keys[0]} must be uint8, got {images.dtype}")
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
        raise ConversionError(
            f"{path}: {keys[0]} has shape {images.shape}; expected (N, H, W) grayscale or (N, H, W, 3) RGB "
            "(3-D MedMNIST volumes are not supported)"
        )
    if labels.dtype.kind not in "iu":
        raise ConversionError(f"{path}: {keys[1]} must hold integers, got {labels.dtype}")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ConversionError(
            f"{path}: {keys[1]} has shape {labels.shape}; expected (N,) or (N, 1) — one class per image "
            "(multi-label sets such as ChestMNIST cannot become class folders)"
        )
    if len(labels) != len(images):
        raise ConversionError(f"{path}: {keys[0]} has {len(images)} images but {keys[1]} has {len(labels)} labels")
    if len(labels) and labels.min() < 0:
        bad = int(np.flatnonzero(labels < 0)[0])
        raise ConversionError(f"{path}: {keys[1]}[{bad}] = {labels[bad]} is negative")
    return images, labels.astype(np.int64)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return buf.getvalue()


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="img", desc="writing PNGs", disable=None, leave=False)


def convert(npz: str | os.PathLike, out: str | os.PathLike | None = None, splits=SPLITS,
            class_names: list[str] | None = None, dataset: str | None = None,
            split_csv: str | os.PathLike | None = None, limit: int | None = None, force: bool = False,
            progress: bool = True) -> dict:
    """Write ``out/<class>/<split>_<index>.png`` and ``split_csv``; return a summary dict."""
    path = Path(npz).expanduser()
    out = Path(out).expanduser() if out is not None else path.with_suffix("")
    split_csv = Path(split_csv).expanduser() if split_csv is not None else out / "split.csv"
    splits = list(dict.fromkeys(splits))  # keep order, drop repeats
    bad = [s for s in splits if s not in SPLITS]
    if not splits or bad:
        raise ConversionError(f"--splits: unknown split(s) {', '.join(map(repr, bad)) or '(none given)'}; "
                              f"choose from {','.join(SPLITS)}")
    if limit is not None and limit < 1:
        raise ConversionError(f"--limit must be at least 1, got {limit}")

    key = (dataset or dataset_key(path) or "").lower()
    if dataset and key not in KNOWN_CLASS_NAMES and key not in UNSUPPORTED:
        raise ConversionError(f"--dataset {dataset!r}: unknown; known: {', '.join(sorted(KNOWN_CLASS_NAMES))}")
    if key in UNSUPPORTED:
        raise ConversionError(f"{path}: {UNSUPPORTED[key]}")
    if key.endswith("3d"):
        raise ConversionError(f"{path}: {key} is a 3-D (volume) set; only 2-D image sets can become PNG folders")

    data = _open_npz(path)
    with data:
        loaded = {s: load_split(data, path, s) for s in splits}  # validate everything before writing
    if limit is not None:
        loaded = {s: (im[:limit], lb[:limit]) for s, (im, lb) in loaded.items()}
    n_labels = max((int(lb.max()) + 1 for _, lb in loaded.values() if len(lb)), default=0)

    if class_names is not None:
        names, origin = _check_names(list(class_names), "--class-names"), "--class-names"
    elif key in KNOWN_CLASS_NAMES:
        names, origin = list(KNOWN_CLASS_NAMES[key]), f"the built-in {key} class list"
    else:
        width = len(str(max(n_labels - 1, 0)))
        names, origin = [f"class_{i:0{width}d}" for i in range(n_labels)], "the labels found"
    for s, (_, lb) in loaded.items():
        over = np.flatnonzero(lb >= len(names))
        if len(over):
            i = int(over[0])
            raise ConversionError(
                f"{path}: {s}_labels[{i}] = {lb[i]} is out of range: {origin} has {len(names)} classes "
                f"(labels 0..{len(names) - 1}){'' if class_names is None else '; give more --class-names'}"
            )

    out_abs = out.absolute()
    if out_abs.exists() and not out_abs.is_dir():
        raise ConversionError(f"--out {out}: exists and is not a folder")
    if out_abs.is_dir() and not force:
        visible = sorted(e.name for e in os.scandir(out_abs) if not e.name.startswith("."))
        if visible:
            raise ConversionError(f"--out {out}: folder is not empty ({', '.join(visible[:5])}"
                                  f"{', …' if len(visible) > 5 else ''}); choose an empty folder or pass --force")

    total = sum(len(lb) for _, lb in loaded.values())
    width = max(6, len(str(max((len(lb) for _, lb in loaded.values()), default=1) - 1)))
    csv_dir = split_csv.absolute().parent
    rows: list[tuple[str, str, str]] = []
    counts = {s: {} for s in splits}
    made: set[str] = set()
    bar = _progress(total, progress)
    try:
        for s, (images, labels) in loaded.items():
            for i, (image, label) in enumerate(zip(images, labels)):
                cls = names[int(label)]
                folder = out_abs / cls
                if cls not in made:
                    folder.mkdir(parents=True, exist_ok=True)
                    made.add(cls)
                target = folder / f"{s}_{i:0{width}d}.png"
                _atomic_write(target, _png_bytes(image))
                rows.append((Path(os.path.relpath(target, csv_dir)).as_posix(), cls, s))
                counts[s][cls] = counts[s].get(cls, 0) + 1
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("path", "label", "split"))
    writer.writerows(rows)
    split_csv.absolute().parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(split_csv.absolute(), buf.getvalue().encode("utf-8"))

    first = next((im for im, _ in loaded.values() if len(im)), None)
    return {
        "npz": str(path), "out": str(out), "split_csv": str(split_csv), "dataset": key or None,
        "classes": names, "class_names_from": origin, "counts": counts, "total": total,
        "image_shape": list(first.shape[1:]) if first is not None else None,
        "empty_classes": [n for n in names if n not in made],
    }


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medmnist_to_folders.py",
        description="Convert a MedMNIST .npz (train/val/test_images + _labels) into a class-folder tree of PNG\n"
        "files, OUT/<class>/<split>_<index>.png, plus split.csv (path,label,split) recording the official split.\n"
        "Images keep their size (28×28 or the 64/128/224 variants); the pipeline resizes them.",
        epilog="Examples:\n"
        "  python data/medmnist_to_folders.py ~/Downloads/bloodmnist.npz --out data/bloodmnist\n"
        "  python data/medmnist_to_folders.py pathmnist.npz --out data/path_small --splits train --limit 2000\n"
        "  python data/medmnist_to_folders.py my.npz --out data/my --class-names benign,malignant\n"
        "  pipeline run --images data/bloodmnist --workdir work/blood\n\n"
        f"Built-in class names: {', '.join(sorted(KNOWN_CLASS_NAMES))}.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("npz", help="the MedMNIST .npz file (e.g. bloodmnist.npz, pathmnist_64.npz)")
    p.add_argument("--out", default=None, help="output folder (default: the .npz path without its extension)")
    p.add_argument("--splits", type=_csv_list, default=list(SPLITS),
                   help="comma-separated splits to convert (default: train,val,test)")
    p.add_argument("--class-names", type=_csv_list, default=None,
                   help="comma-separated folder names for labels 0,1,2,… (default: built in for known sets, "
                   "else class_0, class_1, …)")
    p.add_argument("--dataset", default=None,
                   help="which MedMNIST set this is, for the built-in names (default: from the file name)")
    p.add_argument("--split-csv", default=None, help="where to write the split list (default: OUT/split.csv)")
    p.add_argument("--limit", type=int, default=None, help="convert only the first N images of each split")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out (same names are overwritten)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        s = convert(args.npz, args.out, splits=args.splits, class_names=args.class_names, dataset=args.dataset,
                    split_csv=args.split_csv, limit=args.limit, force=args.force, progress=not args.no_progress)
    except (ConversionError, OSError) as exc:
        print(f"medmnist_to_folders: error: {exc}", file=sys.stderr)
        return 2
    shape = "×".join(map(str, s["image_shape"])) if s["image_shape"] else "?"
    print(f"{s['npz']}: wrote {s['total']} PNG ({shape}) in {time.perf_counter() - t0:.1f}s to {s['out']}")
    print(f"  {len(s['classes'])} classes (names from {s['class_names_from']}): {', '.join(s['classes'])}")
    for split, per in s["counts"].items():
        print(f"  {split:5s} {sum(per.values()):7d}  " + ", ".join(f"{c}={n}" for c, n in sorted(per.items())))
    if s["empty_classes"]:
        print(f"  no images for: {', '.join(s['empty_classes'])}")
    print(f"  split list: {s['split_csv']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
