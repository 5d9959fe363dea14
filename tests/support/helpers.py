"""Shared test helpers: real photographs (from scikit-image) written as small image trees, and a tiny ONNX model."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = {
    "cat": ["chelsea", "cat"],
    "coffee": ["coffee"],
    "space": ["astronaut", "rocket"],
}


def photo(name: str) -> Image.Image:
    from skimage import data

    arr = getattr(data, name)()
    return Image.fromarray(arr).convert("RGB")


def make_image_tree(root: Path, per_class: int = 4, size: int = 96, classes=("cat", "coffee", "space")) -> Path:
    """A class-folder tree of real photos: crops and flips of scikit-image's bundled photographs, as JPEG."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for label in classes:
        (root / label).mkdir(exist_ok=True)
        sources = [photo(n) for n in PHOTOS[label]]
        for i in range(per_class):
            img = sources[i % len(sources)]
            w, h = img.size
            cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            crop = img.crop((x, y, x + cw, y + ch)).resize((size, int(size * ch / cw) or 1))
            if i % 2:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            crop.save(root / label / f"{label}_{i:03d}.jpg", quality=90)
    return root


def make_tiny_onnx(path: Path, input_size: int = 32, channels: int = 8, seed: int = 0) -> Path:
    """A small random conv net (N×3×S×S → N×C×S/2×S/2) for fast mechanics tests; not a pretrained model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.3, size=(channels, 3, 3, 3)).astype(np.float32)
    b = rng.normal(0, 0.1, size=(channels,)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, input_size, input_size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels, input_size // 2, input_size // 2])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def make_dicom_tree(root: Path, secret: str = "SECRETPID") -> dict:
    """A class-folder tree of pydicom's bundled files with patient data set to recognisable secrets.

    ``ct/``: two CT slices of patient ``{secret}-A`` (one extension-less, as archives name files by UID);
    ``mr/``: MR of patient ``{secret}-B`` in two encodings, plus a truncated MR, a structured report and an
    RTSTRUCT without the Part 10 header (all three must be recorded as errors). Returns the secrets written;
    ``secret`` also prefixes each file's StudyInstanceUID.
    """
    import pydicom
    from pydicom.data import get_testdata_file

    def load(name):
        return pydicom.dcmread(get_testdata_file(name, download=False), force=True)

    secrets = {"A": f"{secret}-A", "B": f"{secret}-B", "name": "Secretname^Person",
               "birth": "1901-02-03"}  # not a valid DA: pydicom's warning about it would quote it
    files = {"ct/ct_small.dcm": ("CT_small.dcm", "A"), "ct/1.2.826.0.1.3680043.2.1125.1": ("693_J2KI.dcm", "A"),
             "mr/mr_small.dcm": ("MR_small.dcm", "B"), "mr/mr_rle.dcm": ("MR_small_RLE.dcm", "B"),
             "mr/mr_truncated.dcm": ("MR_truncated.dcm", "B"), "mr/report.dcm": ("test-SR.dcm", "B"),
             "mr/rtstruct.dcm": ("rtstruct.dcm", "B")}
    for rel, (name, patient) in files.items():
        with warnings.catch_warnings():  # the invalid values below make pydicom warn here, in the test's own code
            warnings.simplefilter("ignore")
            _write_with_secrets(load(name), root / rel, secrets, secret, patient, keep_bare=name == "rtstruct.dcm")
    return secrets


def _write_with_secrets(ds, path: Path, secrets: dict, secret: str, patient: str, keep_bare: bool) -> None:
    ds.PatientID = secrets[patient]
    ds.PatientName = secrets["name"]
    ds.PatientBirthDate = secrets["birth"]
    ds.StudyInstanceUID = f"1.2.3.{secret}UID{patient}"  # letters: invalid, so pydicom's warning quotes it
    path.parent.mkdir(parents=True, exist_ok=True)
    # rtstruct.dcm has no preamble or file meta: keep it so (recognised by extension and content)
    ds.save_as(path, enforce_file_format=not keep_bare)
