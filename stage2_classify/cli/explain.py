"""``stage2-classify explain``: heatmaps of what a trained run looks at, as overlay PNGs and ``heatmaps.npz``."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np

from stage2_classify.cli.common import add_run_flag

DESCRIPTION = ("Heatmaps of what each prediction looked at (CAM for a linear head, closed-form Grad-CAM for an "
               "MLP head; docs/explain.md). Writes OUT/overlays/NNNN_name.png (the image, its heatmap, the crop "
               "the model saw as a dashed box, label and probability), OUT/heatmaps.npz (every heatmap, over "
               "the original image and over the crop) and OUT/explanations.csv. DICOM and 16-bit images are "
               "shown through the window the model saw.")


def add_parser(sub) -> None:
    p = sub.add_parser("explain", help="heatmaps of what the model looks at: overlay PNGs and heatmaps.npz",
                       description=DESCRIPTION)
    add_run_flag(p)
    p.add_argument("--images", required=True, help="an image file, a folder (flat or class folders) or a "
                   "CSV/TSV/Parquet file list with a 'path' column")
    p.add_argument("--out", required=True, help="folder to write overlays/, heatmaps.npz and explanations.csv")
    p.add_argument("--target", default="predicted", help="the class to explain: 'predicted' (default) or a "
                   "class name")
    p.add_argument("--weights", default=None, help="the --weights file the run's backbone used, if any")
    p.add_argument("--onnx", default=None, help="the user ONNX model the run was trained on, if any")
    p.set_defaults(handler=run_explain)


def _name(i: int, path: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path.split("#", 1)[0]).stem)[:60] or "image"
    return f"{i:04d}_{stem}.png"


def write_explanations(frame, out: str | os.PathLike) -> dict:
    """Write a :meth:`Classifier.explain` frame (with ``keep_images``) as overlays, npz and CSV; counts."""
    import pandas as pd

    from shardformat import atomic_write_bytes
    from stage2_classify.inference.classifier import write_predictions
    from stage2_classify.reports.overlay import overlay_png

    out = Path(out)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    arrays, names = {}, []
    done = frame[frame["heatmap"].notna()].reset_index(drop=True)
    for i, r in done.iterrows():
        lines = [f"predicted {r.predicted} ({r.probability:.3f})"]
        if r.target != r.predicted:
            lines.append(f"heatmap of {r.target} ({r.target_probability:.3f})")
        lines.append(f"{r.method}; dashed box: the crop the model saw")
        name = _name(i, r.path)
        atomic_write_bytes(out / "overlays" / name, overlay_png(r.image, r.heatmap, r.crop, lines))
        arrays[f"heatmap_{i:04d}"] = r.heatmap
        names.append(f"overlays/{name}")
    if len(done):
        arrays.update(paths=np.asarray(done["path"], str), predicted=np.asarray(done["predicted"], str),
                      target=np.asarray(done["target"], str), probability=done["probability"].to_numpy(np.float32),
                      crop=np.asarray(list(done["crop"]), np.float32),
                      crop_heatmaps=np.stack(list(done["crop_heatmap"])).astype(np.float32))
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(out / "heatmaps.npz", buf.getvalue())
    table = frame[["path", "predicted", "probability", "target", "target_probability", "method", "error"]].copy()
    table["overlay"] = pd.array([None] * len(frame), dtype="string")
    table.loc[frame["heatmap"].notna().to_numpy(), "overlay"] = names
    for j, side in enumerate(("left", "top", "right", "bottom")):
        table[f"crop_{side}"] = [c[j] if isinstance(c, tuple) else np.nan for c in frame["crop"]]
    write_predictions(table.astype({"path": "string", "predicted": "string", "target": "string",
                                    "method": "string", "error": "string"}), out / "explanations.csv")
    return {"overlays": len(done), "failed": int(len(frame) - len(done))}


def run_explain(args) -> None:
    from stage2_classify.inference.classifier import Classifier

    frame = Classifier.load(args.run).explain(args.images, target=args.target, weights=args.weights,
                                              onnx=args.onnx, keep_images=True)
    counts = write_explanations(frame, args.out)
    print(f"{counts['overlays']} overlays in {os.path.join(args.out, 'overlays')}, heatmaps in "
          f"{os.path.join(args.out, 'heatmaps.npz')}, table in {os.path.join(args.out, 'explanations.csv')}"
          + (f"; {counts['failed']} images could not be used (see its error column)" if counts["failed"] else ""))
