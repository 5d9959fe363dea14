#!/usr/bin/env python3
"""Write the default demo data set: Animal-MNIST as a class-folder tree of PNG files.

What: the PyPI package ``animal-mnist`` (0.4) ships 10,000 grayscale 28×28 animal silhouettes,
1,000 per class, as two gzipped NumPy pickles inside the package::

    animal_mnist/data/Animal_MNIST/animal_data_version_3.gz   uint8 array (10000, 28, 28)
    animal_mnist/data/Animal_MNIST/animal_label_version_3.gz  int64 array (10000,), values 0..9

Label ``i`` is the ``i``-th name of the package's documented class list (Bear, Bird, Cat, Cow, Dog,
Elephant, Giraffe, Horse, Sheep, Zebra — alphabetical; checked by looking at the images), so the
folders are ``bear/ bird/ … zebra/``. The package has no train/test split, so there is no ``--split``
option: the pipeline makes its own split.

This script samples ``--per-class`` images of each class (deterministic for a given ``--seed``) and writes
them as ``<out>/<class>/<class>_<index>.png``, where ``<index>`` is the image's position in the package
array — exactly the layout users' own data has, so the demo exercises the same code path. Images stay
28×28 grayscale: stage 1 resizes (and converts to RGB); upscaling here would only waste disk and time.

Why not the package's own loader: it imports TensorFlow and calls plain ``pickle.load``, which runs
whatever code a pickle names. Here the pickles are read with :class:`RestrictedUnpickler`, which only
lets through the few NumPy callables needed to rebuild an array and refuses everything else.

Default ``--per-class 500`` (5,000 images): stage 1 extracts about 100 images/s on a 2-core CPU, so the
demo's extraction takes about a minute. Use ``--per-class 1000`` for the whole set.

Reruns are cheap: when ``<out>`` already holds exactly the expected files and a ``.prepared.json`` marker
with the same parameters, nothing is written. Every image is written to a hidden temporary file and
renamed into place, and the marker is written last (also atomically), so a killed run never leaves a
half-written image and is never mistaken for a finished one. The marker is a hidden file because stage 1
reports any visible file at the top of a class-folder tree as "has no class".
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import io
import json
import os
import pickle
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CLASS_NAMES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
DATA_FILE = "animal_data_version_3.gz"
LABEL_FILE = "animal_label_version_3.gz"
MARKER = ".prepared.json"
# Written by an earlier version of this script: replaced on the next rebuild instead of being refused.
LEGACY_MARKERS = ("_prepared.json",)
MARKER_VERSION = 1
DEFAULT_PER_CLASS = 500
DEFAULT_SEED = 0
DEFAULT_OUT = Path(__file__).resolve().parent / "animal_mnist"
_PNG_RE = re.compile(r"^(?P<cls>[a-z]+)_(?P<idx>\d{5})\.png$")
_TMP_SUFFIX = ".tmp"


# --------------------------------------------------------------------------------------------------
# Restricted unpickling
# --------------------------------------------------------------------------------------------------

def _numpy_core_module(name: str):
    """``numpy._core.<name>`` on NumPy 2, ``numpy.core.<name>`` on NumPy 1 (without the 2.x warning)."""
    import importlib

    try:
        return importlib.import_module(f"numpy._core.{name}")
    except ImportError:  # NumPy 1.x
        return importlib.import_module(f"numpy.core.{name}")


def _allowed_globals() -> dict[tuple[str, str], object]:
    multiarray = _numpy_core_module("multiarray")
    numeric = _numpy_core_module("numeric")
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    # Pickles name the private module of the NumPy version that wrote them; accept both spellings and
    # resolve them to this NumPy's objects (NumPy 1 pickles say numpy.core, NumPy 2 pickles numpy._core).
    for prefix in ("numpy.core", "numpy._core"):
        allowed[(f"{prefix}.multiarray", "_reconstruct")] = multiarray._reconstruct  # protocols 3-4
        allowed[(f"{prefix}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild plain NumPy arrays and nothing else.

    ``find_class`` is the only way a pickle can reach Python callables; this one answers for
    ``numpy.ndarray``, ``numpy.dtype`` and the array reconstructors ``_reconstruct`` (pickle protocols
    3-4) and ``_frombuffer`` (protocol 5), and raises :class:`pickle.UnpicklingError` for any other name
    — ``os.system``, ``builtins.eval``, other NumPy functions, and so on. Containers (tuples, lists,
    dicts) and scalars are built by opcodes and need no globals. (Protocol 0-2 array pickles would also
    need ``_codecs.encode``; they are refused.) Use :func:`load_array` for the extra check that the
    result is a non-object array.
    """

    def __init__(self, file, *, source: str = "<pickle>"):
        super().__init__(file)
        self._source = source
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"{self._source}: refusing to load global '{module}.{name}': this loader only rebuilds "
                f"NumPy arrays (allowed: {', '.join(sorted({f'{m}.{n}' for m, n in self._allowed}))})"
            ) from None


def restricted_loads(data: bytes, *, source: str = "<bytes>"):
    """Unpickle ``data`` with :class:`RestrictedUnpickler`."""
    return RestrictedUnpickler(io.BytesIO(data), source=source).load()


def load_array(path: str | os.PathLike) -> np.ndarray:
    """Read a (optionally gzipped) pickled NumPy array safely; refuse anything but a non-object ndarray."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        obj = RestrictedUnpickler(f, source=str(path)).load()
    if not isinstance(obj, np.ndarray):
        raise pickle.UnpicklingError(f"{path}: expected a NumPy array, got {type(obj).__name__}")
    if obj.dtype.hasobject:
        raise pickle.UnpicklingError(f"{path}: refusing an object-dtype array")
    return obj


# --------------------------------------------------------------------------------------------------
# Source data
# --------------------------------------------------------------------------------------------------

def find_source_dir() -> Path:
    """The package's data folder, located without importing (or running) any of its code."""
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the 'animal-mnist' package is not installed in this Python "
            f"({sys.executable}); install it with: pip install --no-deps animal-mnist"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "Animal_MNIST"


def _source_files(source_dir: Path) -> tuple[Path, Path]:
    data, labels = source_dir / DATA_FILE, source_dir / LABEL_FILE
    missing = [str(p) for p in (data, labels) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"animal-mnist data file(s) not found: {', '.join(missing)}")
    return data, labels


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_labels(path: Path) -> np.ndarray:
    labels = load_array(path)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"{path}: expected a 1-D integer label array, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
        raise ValueError(f"{path}: labels must lie in 0..{len(CLASS_NAMES) - 1}, found {labels.min()}..{labels.max()}")
    return labels


def load_images(path: Path, n: int) -> np.ndarray:
    images = load_array(path)
    if images.ndim != 3 or images.dtype != np.uint8 or images.shape[0] != n:
        raise ValueError(f"{path}: expected uint8 images of shape ({n}, H, W), got {images.dtype} {images.shape}")
    return images


def select(labels: np.ndarray, per_class: int, seed: int) -> dict[str, list[int]]:
    """Indices to write, per class name: ``per_class`` of each class, sorted, deterministic in ``seed``.

    Uses the legacy ``RandomState``, whose stream NumPy keeps stable across versions, so a seed gives
    the same files everywhere.
    """
    rng = np.random.RandomState(seed)
    chosen: dict[str, list[int]] = {}
    for c, name in enumerate(CLASS_NAMES):
        idx = np.flatnonzero(labels == c)
        if per_class > len(idx):
            raise ValueError(f"--per-class {per_class}: class {name!r} has only {len(idx)} images")
        chosen[name] = sorted(int(i) for i in rng.permutation(idx)[:per_class])
    return chosen


def file_name(cls: str, index: int) -> str:
    return f"{cls}_{index:05d}.png"


# --------------------------------------------------------------------------------------------------
# Output folder
# --------------------------------------------------------------------------------------------------

def _is_temp(name: str) -> bool:
    """Our temporary files (``.<name>.<random>.tmp``; ``.tmp-<name>`` from an earlier version)."""
    return name.startswith(".") and (name.endswith(_TMP_SUFFIX) or name.startswith(".tmp-"))


def _scan(out: Path) -> tuple[dict[str, dict[str, int]], list[Path], list[str]]:
    """What ``out`` holds: {class: {png name: size}}, our leftover temp files/old markers, foreign entries."""
    pngs: dict[str, dict[str, int]] = {}
    temps: list[Path] = []
    foreign: list[str] = []
    if not out.is_dir():
        return pngs, temps, foreign
    for entry in os.scandir(out):
        if entry.name.startswith(".") or entry.name in LEGACY_MARKERS:
            if (_is_temp(entry.name) or entry.name in LEGACY_MARKERS) and entry.is_file(follow_symlinks=False):
                temps.append(Path(entry.path))
            continue  # the marker, or hidden files that stage 1 ignores as well
        if entry.name not in CLASS_NAMES or not entry.is_dir(follow_symlinks=False):
            foreign.append(entry.name)
            continue
        files = pngs.setdefault(entry.name, {})
        for sub in os.scandir(entry.path):
            m = _PNG_RE.match(sub.name)
            if _is_temp(sub.name) and sub.is_file(follow_symlinks=False):
                temps.append(Path(sub.path))
            elif sub.name.startswith("."):
                continue
            elif m and m["cls"] == entry.name and sub.is_file(follow_symlinks=False):
                files[sub.name] = sub.stat(follow_symlinks=False).st_size
            else:
                foreign.append(f"{entry.name}/{sub.name}")
    return pngs, temps, sorted(foreign)


def _read_marker(out: Path) -> dict | None:
    try:
        return json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _atomic_write(path: Path, data: bytes, *, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` via a hidden temporary file in the same folder and a rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
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


def prepare(out: str | os.PathLike = DEFAULT_OUT, per_class: int = DEFAULT_PER_CLASS, seed: int = DEFAULT_SEED,
            source_dir: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """Write (or confirm) the class-folder tree; returns a summary dict with ``skipped`` True on a no-op."""
    if per_class < 1:
        raise ValueError(f"--per-class must be at least 1, got {per_class}")
    out = Path(out).expanduser().absolute()
    source_dir = Path(source_dir) if source_dir is not None else find_source_dir()
    data_path, label_path = _source_files(source_dir)

    params = {
        "marker_version": MARKER_VERSION,
        "dataset": "animal-mnist",
        "per_class": per_class,
        "seed": seed,
        "classes": list(CLASS_NAMES),
        "source_sha256": {DATA_FILE: _sha256(data_path), LABEL_FILE: _sha256(label_path)},
    }
    labels = load_labels(label_path)  # tiny; enough to know the expected file names
    chosen = select(labels, per_class, seed)
    expected = {cls: {file_name(cls, i) for i in idx} for cls, idx in chosen.items()}
    summary = {"out": str(out), "classes": list(CLASS_NAMES), "per_class": per_class, "seed": seed,
               "total": per_class * len(CLASS_NAMES), "image_size": None, "skipped": False}

    pngs, temps, foreign = _scan(out)
    marker = _read_marker(out)
    complete = (
        marker is not None
        and {k: marker.get(k) for k in params} == params
        and not temps and not foreign
        and set(pngs) == set(CLASS_NAMES)
        and all(set(pngs[c]) == expected[c] and all(size > 0 for size in pngs[c].values()) for c in CLASS_NAMES)
    )
    if complete:
        summary.update(skipped=True, image_size=marker.get("image_size"))
        return summary
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" … ({len(foreign)} in all)" if len(foreign) > 5 else "")
        raise FileExistsError(
            f"--out {out} holds entries this script did not write: {shown}. "
            "They would end up in the demo's input; remove them or choose another --out."
        )

    # (Re)build. Drop the marker first so an interrupted run is never taken for a finished one.
    out.mkdir(parents=True, exist_ok=True)
    try:
        (out / MARKER).unlink()
    except FileNotFoundError:
        pass
    for tmp in temps:
        tmp.unlink(missing_ok=True)
    for cls, files in pngs.items():
        for name in set(files) - expected.get(cls, set()):
            (out / cls / name).unlink(missing_ok=True)  # left over from other --per-class/--seed

    images = load_images(data_path, len(labels))
    summary["image_size"] = list(images.shape[1:])
    bar = _progress(summary["total"], progress)
    try:
        for cls in CLASS_NAMES:
            (out / cls).mkdir(exist_ok=True)
            for i in chosen[cls]:
                _atomic_write(out / cls / file_name(cls, i), _png_bytes(images[i]))
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    marker = dict(params, image_size=summary["image_size"], counts={c: per_class for c in CLASS_NAMES},
                  created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    _atomic_write(out / MARKER, (json.dumps(marker, indent=2) + "\n").encode(), fsync=True)
    return summary


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prepare_animal_mnist.py",
        description="Write the Animal-MNIST demo set (10 classes of 28×28 grayscale silhouettes from the\n"
        "installed 'animal-mnist' package) as a class-folder tree of PNG files:\n"
        "  OUT/<class>/<class>_<index>.png   (bear bird cat cow dog elephant giraffe horse sheep zebra)\n"
        "The package's pickles are read with a restricted unpickler that only rebuilds NumPy arrays.\n"
        "Deterministic; a rerun with the same parameters on a complete folder does nothing.",
        epilog="Examples:\n"
        "  python data/prepare_animal_mnist.py                      # 500 per class -> data/animal_mnist\n"
        "  python data/prepare_animal_mnist.py --per-class 1000     # the whole set (10,000 images)\n"
        "  python data/prepare_animal_mnist.py --per-class 50 --out /tmp/tiny --seed 1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default=str(DEFAULT_OUT),
                   help="output folder (default: data/animal_mnist next to this script)")
    p.add_argument("--per-class", type=int, default=DEFAULT_PER_CLASS,
                   help=f"images per class, 1..1000 (default {DEFAULT_PER_CLASS}: 5,000 images, about a minute of "
                   "stage 1 extraction on a 2-core CPU)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"sampling seed (default {DEFAULT_SEED})")
    p.add_argument("--source", default=None,
                   help="folder holding the package's .gz files (default: found from the installed package)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        s = prepare(args.out, args.per_class, args.seed, source_dir=args.source, progress=not args.no_progress)
    except (OSError, ValueError, pickle.UnpicklingError) as exc:
        print(f"prepare_animal_mnist: error: {exc}", file=sys.stderr)
        return 2
    size = "×".join(map(str, s["image_size"])) if s["image_size"] else "?"
    if s["skipped"]:
        print(f"animal-mnist: already prepared in {s['out']} ({len(s['classes'])} classes × {s['per_class']} = "
              f"{s['total']} PNG, seed {s['seed']}); nothing to do")
    else:
        print(f"animal-mnist: wrote {s['total']} PNG ({size} grayscale) in {time.perf_counter() - t0:.1f}s "
              f"to {s['out']}\n"
              f"  {len(s['classes'])} classes × {s['per_class']} (seed {s['seed']}): {', '.join(s['classes'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
