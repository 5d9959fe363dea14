#!/usr/bin/env python3
"""DICOM costs in stage 1: the per-run header pass (groups, frames) and decoding per transfer syntax.

1. Header pass. Every run reads each DICOM file's header in the parent (``dicom_records``) so that groups
   and per-frame rows exist before planning. Measured per file, interleaved round by round on the same
   copies (page cache warm): pydicom reading the file (baseline) against parsing its first 64 KiB from
   memory (what the code does), and the whole ``prepare_dicom_records`` pass.
2. Decoding. ``decode_image`` (pixels, LUTs, window, resize and crop to 224) per encoding of pydicom's
   bundled files, against the same pixels as an 8-bit PNG through the same function (the baseline: what a
   pre-converted export costs).

    python bench/dicom.py            # 600 files, 3 rounds (~20 s on 2 cores)
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ENCODINGS = {  # bundled file → what it exercises
    "MR_small.dcm": "explicit VR LE 64² MR",
    "MR_small_RLE.dcm": "RLE 64² MR",
    "CT_small.dcm": "explicit VR LE 128² CT",
    "693_J2KI.dcm": "JPEG 2000 512² CT",
    "JPGExtended.dcm": "JPEG extended 12-bit 256×1024 NM",
    "MR_small_jpeg_ls_lossless.dcm": "JPEG-LS 64² MR",
    "examples_ybr_color.dcm": "JPEG baseline YBR 320×240 US (frame 1 of 30)",
}


def _per_file_ms(fn, files) -> float:
    t0 = time.perf_counter()
    for f in files:
        fn(f)
    return (time.perf_counter() - t0) / len(files) * 1000


def header_pass(n: int, rounds: int) -> dict:
    from pydicom.data import get_testdata_file

    from stage1_extract.inputs import dicom_records
    from stage1_extract.decoding.dicom import read_dataset
    from stage1_extract.inputs.listing import list_images

    tmp = Path(tempfile.mkdtemp(prefix="bench-dicom-"))
    try:
        sources = [get_testdata_file(name, download=False) for name in ENCODINGS]
        for i in range(n):
            shutil.copy(sources[i % len(sources)], tmp / f"{i:05d}.dcm")
        files = sorted(str(p) for p in tmp.iterdir())
        os.environ.setdefault(dicom_records.SALT_ENV, "benchmark-salt-0123456789")
        listing = list_images(tmp)

        def whole_file(path):
            read_dataset(path, stop_before_pixels=True, specific_tags=dicom_records._HEADER_TAGS)

        results = {"whole_file_ms": [], "head_64k_ms": [], "prepare_dicom_records_ms": []}
        for _ in range(rounds):
            results["whole_file_ms"].append(_per_file_ms(whole_file, files))
            results["head_64k_ms"].append(_per_file_ms(dicom_records._header, files))
            t0 = time.perf_counter()
            dicom_records.prepare_dicom_records(listing)
            results["prepare_dicom_records_ms"].append((time.perf_counter() - t0) / n * 1000)
        out = {k: {"rounds": [round(v, 3) for v in vs], "median": round(statistics.median(vs), 3)}
               for k, vs in results.items()}
        out["files"] = n
        out["head_speedup"] = round(out["whole_file_ms"]["median"] / out["head_64k_ms"]["median"], 2)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def decoding(repeat: int) -> dict:
    import numpy as np
    from PIL import Image
    from pydicom.data import get_testdata_file

    from stage1_extract.decoding.image import decode_image
    from stage1_extract.decoding.dicom import dicom_pixels
    from stage1_extract.model.preprocessing import Preprocessing

    prep = Preprocessing(input_size=224, resize=256)
    rows = {}
    for name, what in ENCODINGS.items():
        with open(get_testdata_file(name, download=False), "rb") as fh:
            data = fh.read()
        buf = io.BytesIO()
        Image.fromarray(dicom_pixels(data)).save(buf, "PNG")
        png = buf.getvalue()
        decode_image(data, prep), decode_image(png, prep)  # warm imports and plugin discovery
        dicom_ms = min(_per_file_ms(lambda _: decode_image(data, prep), range(repeat)) for _ in range(3))
        png_ms = min(_per_file_ms(lambda _: decode_image(png, prep), range(repeat)) for _ in range(3))
        rows[name] = {"what": what, "dicom_ms": round(dicom_ms, 3), "same_pixels_as_png_ms": round(png_ms, 3),
                      "ratio": round(dicom_ms / png_ms, 2)}
        assert np.asarray(decode_image(data, prep)).shape == (224, 224, 3)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=600)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeat", type=int, default=20, help="decodes per encoding per timing")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "dicom-cpu.json")
    args = p.parse_args(argv)
    result = {
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                    "note": "shared machine: absolute times are noisy, the same-run ratios are the result"},
        "header_pass": header_pass(args.files, args.rounds),
        "decode_224": decoding(args.repeat),
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
