"""Heatmap overlays: an image with what the model looked at laid over it, as a PNG or a report thumbnail.

The heatmap covers the whole original image (0 outside the centre crop the model saw); the crop is drawn
as a dashed box. Full overlays are drawn with matplotlib's object API (``matplotlib.figure.Figure``: no
pyplot, the backend is left as it was); class names are shown as plain text (``parse_math=False``), never
as mathtext. Report thumbnails are blended with PIL (fast enough for a gallery of sixty).
"""

from __future__ import annotations

import base64
import io
import os

import numpy as np

COLORMAP = "jet"
ALPHA = 0.45  # heatmap opacity at its maximum (scaled down with the value, so cold areas stay readable)


def _rgba(heatmap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The heatmap resized to ``shape`` (h, w) as an RGBA uint8 array, its opacity growing with the value."""
    from matplotlib import colormaps
    from PIL import Image

    heat = np.asarray(Image.fromarray(np.asarray(heatmap, np.float32), mode="F")
                      .resize((shape[1], shape[0]), Image.Resampling.BILINEAR))
    rgba = colormaps[COLORMAP](np.clip(heat, 0, 1))
    rgba[..., 3] = ALPHA * np.clip(heat, 0, 1) ** 0.5
    return (rgba * 255).astype(np.uint8)


def blend(image: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """``image`` (H×W×3 uint8) with ``heatmap`` blended over it: H×W×3 uint8."""
    rgba = _rgba(heatmap, image.shape[:2]).astype(np.float32)
    a = rgba[..., 3:] / 255.0
    return (image.astype(np.float32) * (1 - a) + rgba[..., :3] * a).round().astype(np.uint8)


def thumbnail_uri(image: np.ndarray, heatmap: np.ndarray, crop, size: int = 136) -> str:
    """A JPEG data URI of the overlay, longer side ``size`` pixels, the crop box dotted in white."""
    from PIL import Image, ImageDraw

    out = Image.fromarray(blend(image, heatmap))
    scale = size / max(out.size)
    out = out.resize((max(1, round(out.width * scale)), max(1, round(out.height * scale))),
                     Image.Resampling.NEAREST if scale > 2 else Image.Resampling.BILINEAR)
    left, top, right, bottom = (v * scale for v in crop)
    ImageDraw.Draw(out).rectangle((left, top, right - 1, bottom - 1), outline=(255, 255, 255))
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def overlay_png(image: np.ndarray, heatmap: np.ndarray, crop, lines: list[str], dpi: int = 100) -> bytes:
    """A PNG of the image with its heatmap, the crop box and ``lines`` of caption (plain text) underneath."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    h, w = image.shape[:2]
    width = 4.0
    fig = Figure(figsize=(width, width * h / w + 0.25 + 0.2 * len(lines)), dpi=dpi)
    ax = fig.add_axes((0, 0.2 * len(lines) / fig.get_figheight() + 0.02, 1,
                       1 - (0.2 * len(lines) + 0.25) / fig.get_figheight()))
    ax.imshow(image, extent=(0, w, h, 0), interpolation="nearest" if max(h, w) < 200 else "antialiased")
    ax.imshow(_rgba(heatmap, (h, w)), extent=(0, w, h, 0))
    left, top, right, bottom = crop
    ax.add_patch(Rectangle((left, top), right - left, bottom - top, fill=False, edgecolor="white",
                           linestyle="--", linewidth=1.2))
    ax.set_axis_off()
    for i, line in enumerate(lines):
        fig.text(0.02, (0.2 * (len(lines) - i) - 0.15) / fig.get_figheight(), line, fontsize=9,
                 parse_math=False, usetex=False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def gallery_overlays(run, paths, locate) -> tuple[dict[str, str], list[str]]:
    """Overlay thumbnails (heatmap of the run's predicted class) for a gallery's ``paths`` (``locate``: path →
    file or None), keyed by path, and notes on what could not be shown; never raises (a report must not fail
    for want of a heatmap)."""
    located = {p: locate(p) for p in paths}
    by_file = {os.fspath(f): p for p, f in located.items() if f is not None}
    if run is None or not by_file:
        return {}, []
    files = list(by_file)
    try:
        from stage2_classify.inference.explain import explain

        frame = explain(os.fspath(run), list(files), keep_images=True)
    except Exception as exc:  # noqa: BLE001  (no backbone, no feature map, a user ONNX file not given…)
        return {}, [f"heatmaps are not shown: {exc}"]
    uris = {by_file[r.path]: thumbnail_uri(r.image, r.heatmap, r.crop) for r in frame.itertuples()
            if isinstance(r.heatmap, np.ndarray) and r.path in by_file}
    failed = len(files) - len(uris)
    return uris, ([f"heatmaps could not be made for {failed} of {len(files)} images"] if failed else [])
