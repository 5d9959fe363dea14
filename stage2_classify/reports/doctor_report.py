"""The doctor's ``report.html``: summary, suspicious labels, duplicate pairs, outliers and a 2-D map.

Thumbnails, the map and every table are embedded (``stage2_classify.reports.html``); the CSV files next to
the report hold the complete lists, the report shows the top of each.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from stage2_classify.reports.html import Thumbnails, cards, esc, notes, page, scatter_svg, table, write_html
from stage2_classify.reports.overlay import gallery_overlays

GALLERY = 60  # label issues and outliers shown with thumbnails
PAIRS = 40  # duplicate pairs shown per kind
MAP_POINTS = 1500  # t-SNE cost grows quickly: ~5 s for 1,500 points on 2 cores


def project_2d(unit: np.ndarray, seed: int = 0) -> np.ndarray:
    """PCA to at most 50 dimensions (denoises, and makes t-SNE's neighbour search cheap), then t-SNE to 2-D."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    n = len(unit)
    reduced = PCA(n_components=min(50, n, unit.shape[1]), random_state=seed).fit_transform(unit)
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3.0)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", max_iter=500, random_state=seed,
                learning_rate="auto").fit_transform(reduced)


def _map_rows(n: int, marked: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Every marked row (up to half the budget), then a random sample of the others."""
    rng = np.random.default_rng(seed)
    marked = marked[:limit // 2]
    rest = np.setdiff1d(np.arange(n), marked)
    extra = rng.choice(rest, size=min(len(rest), limit - len(marked)), replace=False)
    return np.sort(np.concatenate([marked, extra]).astype(np.int64))


def _map_section(ctx: dict, issues: pd.DataFrame, outliers: pd.DataFrame) -> str:
    paths, labels, unit = ctx["paths"], ctx["labels"], ctx["unit"]
    n = len(paths)
    if n < 5:
        return notes([f"only {n} rows: too few for a map"])
    where = pd.Series(np.arange(n), index=paths)
    issue_rows = where.reindex(issues["path"]).dropna().astype(int).to_numpy()
    outlier_rows = where.reindex(outliers["path"]).dropna().astype(int).to_numpy()
    rows = _map_rows(n, np.unique(np.concatenate([issue_rows, outlier_rows])), MAP_POINTS, ctx["seed"])
    xy = project_2d(unit[rows], ctx["seed"])
    mark = np.full(n, "", dtype=object)
    mark[outlier_rows] = "outlier"
    mark[issue_rows] = "issue"
    suggested = dict(zip(issues["path"], issues["suggested_label"]))
    titles = [f"{paths[r]} · {labels[r] or 'unlabelled'}"
              + (f" → suggested {suggested[paths[r]]}" if paths[r] in suggested else "")
              + (" · outlier" if mark[r] == "outlier" else "") for r in rows]
    svg = scatter_svg(xy, [str(labels[r]) for r in rows], titles, [str(mark[r]) for r in rows])
    shown = f"{len(rows)} of {n} images" if len(rows) < n else f"all {n} images"
    return (f'<p class="muted">{shown} (every flagged one included), PCA to 50 dimensions then t-SNE; '
            "colour = given label; ringed = likely mislabelled; red square = outlier. Hover a point for its path."
            f"</p>{svg}")


def _issue_gallery(issues: pd.DataFrame, thumbs: Thumbnails, run=None) -> str:
    if issues.empty:
        return "<p>No likely label mistakes were found.</p>"
    shown = issues.head(GALLERY)
    overlays, problems = gallery_overlays(run, shown["path"], thumbs.locate)
    tiles = [thumbs.tile(r.path, [f"given <b>{esc(r.label)}</b>", f'suggested <b class="flag">'
                                  f"{esc(r.suggested_label)}</b>",
                                  f"score {r.score:.3f} · P(given) {1 - r.score:.2g}"], overlays.get(r.path))
             for r in shown.itertuples()]
    more = f"<p class=muted>{len(issues) - GALLERY} more in label_issues.csv</p>" if len(issues) > GALLERY else ""
    legend = (" Overlays: what the run's model looked at for its own prediction (docs/explain.md); the box is the "
              "crop it saw." if overlays else " (With --run, the tiles show heatmap overlays.)")
    return ('<p class="muted">Most suspicious first. score = 1 − P(given), the out-of-fold probability of the '
            f'given label; the suggested label is the out-of-fold prediction.{legend}</p>{notes(problems)}'
            f'<div class="gallery">{"".join(tiles)}</div>' + more)



def _pairs(frame: pd.DataFrame, thumbs: Thumbnails, kind: str) -> str:
    part = frame[frame["kind"] == kind]
    if part.empty:
        return f"<p>No {'exact' if kind == 'exact' else 'near'}-duplicates.</p>"
    blocks = []
    for r in part.head(PAIRS).itertuples():
        flags = [f for f, on in (("different labels", r.label_conflict), ("across splits (leak)", r.leak)) if on]
        caption = (f'<div>similarity {r.similarity:.3f}</div>'
                   + "".join(f'<div class="flag">{esc(f)}</div>' for f in flags))
        blocks.append(f'<div class="pair">{thumbs.tile(r.path_a, [esc(r.label_a), esc(r.split_a)])}'
                      f'{thumbs.tile(r.path_b, [esc(r.label_b), esc(r.split_b)])}<div>{caption}</div></div>')
    more = f"<p class=muted>{len(part) - PAIRS} more in duplicates.csv</p>" if len(part) > PAIRS else ""
    return f'<div class="gallery">{"".join(blocks)}</div>{more}'


def _outlier_gallery(outliers: pd.DataFrame, thumbs: Thumbnails) -> str:
    if outliers.empty:
        return "<p>No outliers above the threshold.</p>"
    tiles = [thumbs.tile(r.path, [esc(r.label or "unlabelled"), f"score {r.score:.2f}"])
             for r in outliers.head(GALLERY).itertuples()]
    more = f"<p class=muted>{len(outliers) - GALLERY} more in outliers.csv</p>" if len(outliers) > GALLERY else ""
    return f'<div class="gallery">{"".join(tiles)}</div>{more}'


def write_doctor_report(path: Path, summary: dict, issues: pd.DataFrame, duplicates: pd.DataFrame,
                        outliers: pd.DataFrame, ctx: dict) -> Path:
    """Render ``report.html`` from the doctor's findings; ``ctx`` holds the vectors, paths and image root."""
    thumbs = Thumbnails(ctx.get("images"))
    c = summary["counts"]
    exact = duplicates[duplicates["kind"] == "exact"]
    near = duplicates[duplicates["kind"] == "near"]
    body = {
        "label-issues": _issue_gallery(issues, thumbs, ctx.get("run")),
        "duplicates": (f"<h3>Exact duplicates ({len(exact)} pairs; groups with different labels first)</h3>"
                       + _pairs(duplicates, thumbs, "exact")
                       + f"<h3>Near-duplicates ({len(near)} pairs at cosine similarity ≥ "
                       f"{summary['thresholds']['near']})</h3>" + _pairs(duplicates, thumbs, "near")),
        "outliers": _outlier_gallery(outliers, thumbs),
        "map": _map_section(ctx, issues, outliers),
    }
    headline = cards([("images", c["rows"], False), ("likely mislabelled", c["label_issues"], c["label_issues"] > 0),
                      ("exact-duplicate groups with different labels", c["exact_conflicting_groups"],
                       c["exact_conflicting_groups"] > 0),
                      ("exact-duplicate pairs", c["exact_pairs"], False),
                      ("near-duplicate pairs", c["near_pairs"], False),
                      ("duplicate pairs across splits", c["leak_pairs"], c["leak_pairs"] > 0),
                      ("outliers", c["outliers"], False)])
    facts = table(["", ""], [("shards", summary["shards"]), ("backbone", summary["backbone"]),
                             ("labelled rows", f"{c['labelled']} in {c['classes']} classes"),
                             ("checked for label issues", c["scored"]),
                             ("splits", summary["splits"]["source"]), ("images", ctx.get("images") or "not given")])
    summary_html = headline + notes(summary["notes"] + thumbs.problems()) + facts
    method = table(["check", "how"], [(k.replace("_", " "), v) for k, v in summary["method"].items()]
                   + [("thresholds", ", ".join(f"{k} = {v}" for k, v in summary["thresholds"].items()))])
    sections = [("summary", "Summary", summary_html),
                ("label-issues", f"Likely mislabelled ({len(issues)})", body["label-issues"]),
                ("duplicates", f"Duplicates ({len(exact)} exact, {len(near)} near pairs)", body["duplicates"]),
                ("outliers", f"Outliers ({len(outliers)})", body["outliers"]),
                ("map", "Map of the vectors", body["map"]),
                ("method", "Method", method)]
    return write_html(path, page("Data doctor report", f"{summary['shards']} · {c['rows']} images", sections))
