"""Building blocks of the self-contained HTML reports (the doctor's and every training run's).

A report is one file: styles inline, images as base64 ``data:`` URIs, plots as embedded PNG or inline SVG.
It fetches nothing from the network and runs no script, so it opens the same in any browser, offline, or
attached to a ticket.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

MAX_PIXELS = 100_000_000  # refuse to decode bigger images for a thumbnail (a decompression bomb)

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:#1d2430;background:#f6f7f9}
header{background:#1d2430;color:#fff;padding:18px 28px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#c5ccd8}nav{padding:8px 28px;background:#e9ecf1;position:sticky;top:0;z-index:2}
nav a{margin-right:16px;color:#1d4ed8;text-decoration:none}main{padding:8px 28px 40px;max-width:1400px}
section{background:#fff;border:1px solid #dde2ea;border-radius:8px;padding:14px 18px;margin:16px 0}
h2{margin:0 0 10px;font-size:18px}h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;font-size:13px}th,td{border-bottom:1px solid #e5e8ee;padding:4px 10px;text-align:left}
th{background:#f1f3f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{background:#f1f3f6;border-radius:6px;padding:8px 14px;min-width:120px}
.card b{display:block;font-size:22px}.card.bad b{color:#b91c1c}.gallery{display:flex;flex-wrap:wrap;gap:10px}
.tile{width:150px;border:1px solid #dde2ea;border-radius:6px;padding:6px;background:#fff;font-size:12px}
.tile img,.ph{width:136px;height:136px;object-fit:contain;background:#eef0f3;display:block;margin:0 auto 4px}
.ph{display:flex;align-items:center;justify-content:center;color:#6b7280;text-align:center;font-size:11px}
.pair{display:flex;gap:6px;border:1px solid #dde2ea;border-radius:6px;padding:6px;background:#fff;font-size:12px}
.pair .tile{border:none;padding:0}.path{word-break:break-all;color:#4b5563}.flag{color:#b91c1c;font-weight:600}
.note{background:#fff7e6;border-left:3px solid #f59e0b;padding:6px 10px;margin:6px 0}
figure{margin:8px 0}figure img{max-width:100%}.muted{color:#6b7280}svg text{font-size:11px}
"""


def esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def page(title: str, subtitle: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """A whole HTML document: ``sections`` are (id, heading, body html), linked from a navigation bar."""
    nav = "".join(f'<a href="#{esc(i)}">{esc(h)}</a>' for i, h, _ in sections)
    body = "".join(f'<section id="{esc(i)}"><h2>{esc(h)}</h2>{b}</section>' for i, h, b in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{STYLE}</style></head>'
            f'<body><header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header><nav>{nav}</nav>'
            f"<main>{body}</main></body></html>")


def write_html(path: str | os.PathLike, text: str) -> Path:
    """Write a report atomically (temporary name, then rename)."""
    from shardformat import atomic_write_text

    atomic_write_text(path, text)
    return Path(path)


def cards(items: Iterable[tuple[str, object, bool]]) -> str:
    """Headline numbers: (caption, value, is_bad)."""
    return '<div class="cards">' + "".join(
        f'<div class="card{" bad" if bad else ""}"><b>{esc(v)}</b>{esc(k)}</div>' for k, v, bad in items) + "</div>"


def notes(lines: Iterable[str]) -> str:
    return "".join(f'<div class="note">{esc(n)}</div>' for n in lines)


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], numeric: Sequence[bool] | None = None) -> str:
    numeric = list(numeric or [False] * len(headers))
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td{" class=num" if numeric[i] else ""}>{esc(v)}</td>'
                                    for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def figure_file(path: Path, caption: str) -> str:
    """An existing PNG embedded, or a note naming the missing file."""
    if not path.is_file():
        return notes([f"{path.name} is missing from {path.parent}"])
    return f'<figure><img alt="{esc(caption)}" src="{png_uri(path.read_bytes())}"><figcaption class="muted">' \
           f"{esc(caption)}</figcaption></figure>"


def figure_matplotlib(fig, caption: str) -> str:
    """A matplotlib figure (a ``matplotlib.figure.Figure``: no pyplot, nothing to close) as an embedded PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return f'<figure><img alt="{esc(caption)}" src="{png_uri(buf.getvalue())}"><figcaption class="muted">' \
           f"{esc(caption)}</figcaption></figure>"


class Thumbnails:
    """Small JPEG previews of image files as data URIs; counts the files it could not show."""

    def __init__(self, root: str | os.PathLike | None, size: int = 136) -> None:
        self.root = None if root is None else Path(root).expanduser()
        self.size = size
        self.missing: list[str] = []
        self.unreadable: list[str] = []
        self._cache: dict[str, str | None] = {}

    def locate(self, path: str) -> Path | None:
        if self.root is None and not os.path.isabs(path):
            return None
        return Path(path) if os.path.isabs(path) else self.root / path

    def uri(self, path: str) -> str | None:
        if path not in self._cache:
            self._cache[path] = self._make(path)
        return self._cache[path]

    def _make(self, path: str) -> str | None:
        from PIL import Image, ImageOps

        file = self.locate(path)
        if file is None:
            return None
        if not file.is_file() and not _is_frame_of_a_file(file):
            self.missing.append(path)
            return None
        data = None
        try:
            with Image.open(file) as im:
                if im.width * im.height > MAX_PIXELS:
                    self.unreadable.append(path)  # a decompression bomb is not decoded for a thumbnail
                    return None
                if im.mode not in ("I", "I;16", "I;16B", "F"):  # 16-bit / float: shown in the model's window
                    im.draft("RGB", (self.size * 2, self.size * 2))  # JPEG: decode at reduced scale, much faster
                    data = self._jpeg(ImageOps.exif_transpose(im))
        except Exception:  # noqa: BLE001  (DICOM, a frame reference, damaged: stage 1's decoding below)
            pass
        if data is None:  # DICOM, 16-bit, frames: the pixels stage 1 decodes (windowed), or "no preview"
            data = self._windowed(file)
            if data is None:
                self.unreadable.append(path)
                return None
        return "data:image/jpeg;base64," + base64.b64encode(data).decode()

    def _jpeg(self, im) -> bytes:
        from PIL import Image

        im = im.convert("RGB")
        im.thumbnail((self.size, self.size))
        if max(im.size) < self.size // 2:  # tiny images (28x28) shown crisp rather than blurred
            scale = self.size // max(im.size)
            im = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=82)
        return buf.getvalue()

    def _windowed(self, file: Path) -> bytes | None:
        """DICOM, 16-bit and float images as stage 1 shows them to the model (its window), or None."""
        from PIL import Image

        from stage1_extract import load_image

        try:
            return self._jpeg(Image.fromarray(load_image(file)))
        except Exception:  # noqa: BLE001  (damaged or foreign: "no preview")
            return None

    def img(self, path: str, uri: str | None = None) -> str:
        if uri is not None:  # a heatmap overlay
            return f'<img class="overlay" alt="{esc(path)} with its heatmap" src="{uri}">'
        uri = self.uri(path)
        if uri is not None:
            return f'<img alt="{esc(path)}" src="{uri}">'
        if self.root is None and not os.path.isabs(path):
            reason = "no image root"
        elif path in self.missing:
            reason = "file missing"
        else:
            reason = "no preview"
        return f'<div class="ph">{reason}</div>'

    def tile(self, path: str, lines: Sequence[str], uri: str | None = None) -> str:
        """A thumbnail (or ``uri``, e.g. a heatmap overlay), the path and ``lines`` of escaped html."""
        text = "".join(f"<div>{line}</div>" for line in lines)
        return f'<div class="tile">{self.img(path, uri)}<div class="path">{esc(path)}</div>{text}</div>'

    def problems(self) -> list[str]:
        out = []
        if self.missing:
            out.append(f"missing image files: {len(self.missing)} under {self.root} (e.g. {self.missing[0]}); "
                       "their thumbnails are left out")
        if self.unreadable:
            out.append(f"images that could not be previewed: {len(self.unreadable)} (e.g. {self.unreadable[0]})")
        return out


def _is_frame_of_a_file(file: Path) -> bool:
    """``scan.dcm#frame=3``: one frame of a multi-frame file that exists."""
    name = os.fspath(file)
    return "#frame=" in name and os.path.isfile(name.split("#frame=", 1)[0])


PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#393b79", "#ad494a", "#8ca252", "#bd9e39", "#a55194", "#6b6ecf", "#e7969c", "#637939"]


def scatter_svg(xy: np.ndarray, groups: Sequence[str], titles: Sequence[str], marks: Sequence[str],
                width: int = 900, height: int = 640) -> str:
    """An inline SVG scatter: colour by group, a hover title per point; ``marks`` per point: "" (plain),
    "issue" (ringed in black) or "outlier" (a red square). Legend on the right."""
    xy = np.asarray(xy, dtype=np.float64)
    names = sorted(set(groups))
    colour = {g: PALETTE[i % len(PALETTE)] for i, g in enumerate(names)}
    plot_w, pad = width - 170, 14
    lo, hi = (xy.min(axis=0), xy.max(axis=0)) if len(xy) else (np.zeros(2), np.ones(2))
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    px = pad + (xy - lo) / span * np.array([plot_w - 2 * pad, height - 2 * pad])
    order = np.argsort([m != "" for m in marks], kind="stable")  # marked points drawn last, on top
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="2-D map of the feature vectors"><rect width="{plot_w}" height="{height}" fill="#fbfbfc" '
             f'stroke="#dde2ea"/>']
    for i in order:
        x, y = px[i, 0], height - px[i, 1]
        c, t = colour[groups[i]], f"<title>{esc(titles[i])}</title>"
        if marks[i] == "outlier":
            parts.append(f'<rect x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" fill="{c}" stroke="#b91c1c" '
                         f'stroke-width="2">{t}</rect>')
        elif marks[i] == "issue":
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{c}" stroke="#000" stroke-width="2">{t}'
                         "</circle>")
        else:
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{c}" fill-opacity="0.75">{t}</circle>')
    ly = 16
    for g in names[:30]:
        parts.append(f'<circle cx="{plot_w + 16}" cy="{ly - 4}" r="5" fill="{colour[g]}"/>'
                     f'<text x="{plot_w + 26}" y="{ly}">{esc(g or "(unlabelled)")}</text>')
        ly += 17
    if len(names) > 30:
        parts.append(f'<text x="{plot_w + 10}" y="{ly}">… {len(names) - 30} more</text>')
        ly += 17
    parts.append(f'<circle cx="{plot_w + 16}" cy="{ly + 8}" r="5" fill="#fff" stroke="#000" stroke-width="2"/>'
                 f'<text x="{plot_w + 26}" y="{ly + 12}">label issue</text>'
                 f'<rect x="{plot_w + 12}" y="{ly + 22}" width="8" height="8" fill="#fff" stroke="#b91c1c" '
                 f'stroke-width="2"/><text x="{plot_w + 26}" y="{ly + 30}">outlier</text></svg>')
    return "".join(parts)
