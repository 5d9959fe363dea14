"""``report.html`` for a training run: metrics with intervals, per-class table, confusion matrix, calibration,
training curves and a gallery of misclassified test images.

It reads only the run directory's files (``metrics.json``, ``history.json``, ``config.json``, ``run.json``,
``predictions.parquet``, the PNG plots), so it can be written for any run, old or new, and says which file
is missing instead of failing. Thumbnails come from ``images`` or the image root stage 1 recorded beside the
shards the run was trained on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from hybrid_common import renamed_keywords
from stage2_classify.reports.html import Thumbnails, cards, esc, figure_file, notes, page, table, write_html
from stage2_classify.reports.overlay import gallery_overlays

GALLERY = 60  # misclassified test images shown, most confident mistakes first
METRICS = (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"), ("macro_f1", "macro-F1"),
           ("roc_auc_ovr", "ROC AUC (one-vs-rest)"), ("log_loss", "log-loss"), ("ece", "calibration error (ECE)"))


def _read_json(path: Path, missing: list[str]):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        missing.append(path.name)
    except (OSError, ValueError) as exc:
        missing.append(f"{path.name} (unreadable: {exc})")
    return None


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    if isinstance(value, bool) or isinstance(value, (int, np.integer)):
        return str(value)
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}"
    if isinstance(value, dict):  # e.g. split sizes: "train 295 · validation 58 · test 68"
        return " · ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return str(value)


def _with_interval(m: dict, name: str) -> str:
    ci = (m.get("ci95") or {}).get(name)
    return _fmt(m.get(name)) + (f" [{ci[0]:.3f}–{ci[1]:.3f}]" if ci else "")


def _metrics_table(metrics: dict) -> str:
    splits = [s for s in ("train", "validation", "test") if isinstance(metrics.get(s), dict)]
    if not splits:
        return notes(["metrics.json holds no per-split metrics"])
    names = [(k, label) for k, label in METRICS if any(metrics[s].get(k) is not None for s in splits)]
    rows = [("images", *[_fmt(metrics[s].get("n")) for s in splits])]
    rows += [(label, *[_with_interval(metrics[s], k) for s in splits]) for k, label in names]
    has_ci = any(metrics[s].get("ci95") for s in splits)
    caption = ("<p class=muted>Brackets: 95% bootstrap intervals.</p>" if has_ci else
               "<p class=muted>This run's metrics.json has no intervals (trained before they were recorded).</p>")
    baseline = metrics.get("majority_rate_test")
    base = f"<p>Majority-class rate on test: {_fmt(baseline)}</p>" if baseline is not None else ""
    return table(["", *splits], rows, [False] + [True] * len(splits)) + caption + base


def _per_class_table(m: dict) -> str:
    per_class = m.get("per_class") or {}
    if not per_class:
        return notes(["metrics.json has no per-class metrics"])
    fields = [f for f in ("precision", "recall", "specificity", "f1", "roc_auc", "support")
              if any(f in v for v in per_class.values())]
    rows = [(c, *[_fmt(v.get(f)) for f in fields]) for c, v in per_class.items()]
    return table(["class", *fields], rows, [False] + [True] * len(fields))


def _confusion(run: Path, m: dict, classes: list[str]) -> str:
    if (run / "confusion_matrix.png").is_file():
        return figure_file(run / "confusion_matrix.png", "rows: true class, columns: predicted class")
    cm = m.get("confusion_matrix")
    if not cm:
        return notes(["confusion_matrix.png is missing and metrics.json has no confusion matrix"])
    rows = [(classes[i] if i < len(classes) else i, *row) for i, row in enumerate(cm)]
    return notes(["confusion_matrix.png is missing; the matrix from metrics.json:"]) + table(
        ["true \\ predicted", *classes[:len(cm)]], rows, [False] + [True] * len(cm))


def _calibration(run: Path, m: dict) -> str:
    bins = m.get("reliability") or []
    text = f"<p>Expected calibration error: {_fmt(m.get('ece'))}</p>" if m.get("ece") is not None else ""
    if bins:
        text += table(["confidence bin", "images", "mean confidence", "accuracy"],
                      [(f"{b['low']:.1f}–{b['high']:.1f}", b["count"], _fmt(b["confidence"]), _fmt(b["accuracy"]))
                       for b in bins], [False, True, True, True])
    plot = next((run / n for n in ("reliability.png", "calibration.png") if (run / n).is_file()), None)
    if plot is not None:
        return figure_file(plot, "accuracy per confidence bin against the diagonal") + text
    return notes(["reliability.png is missing (runs trained before calibration was recorded)"]) + text


def _head_fact(choice, hidden, config: dict) -> str:
    """The head kept (and how it was chosen, ``training/heads.py``), or the config's hidden sizes (older runs)."""
    if isinstance(choice, dict) and choice.get("head"):
        from stage2_classify.training.heads import describe_choice

        return describe_choice(choice)
    return "linear" if hidden == [] else f"hidden {hidden}, dropout {config.get('dropout')}"


def _groups_section(metrics: dict) -> str:
    """Grouping source, units per class and split, the warnings, and the per-group scores."""
    g = metrics.get("groups")
    if not isinstance(g, dict):
        return notes(["metrics.json records no grouping (a run from before groups were reported)"])
    unit = "groups" if g.get("grouped") else "images (no groups)"
    per = g.get("units_per_class") or {}
    rows = [(c, e.get("all"), e.get("train"), e.get("validation"), e.get("test")) for c, e in per.items()]
    out = (f"<p>Grouping: {esc(g.get('source'))}. Units the split keeps together: {esc(unit)}.</p>"
           + notes([f"warning: {w}" for w in g.get("warnings") or []] + list(g.get("notes") or []))
           + table(["class", "all", "train", "validation", "test"], rows, [False, True, True, True, True]))
    by_group = metrics.get("by_group") or {}
    if by_group:
        rows = []
        for split, m in by_group.items():
            gl = m.get("group_level") or {}
            rows.append((split, m.get("groups"), m.get("mixed_label_groups"),
                         *[_with_interval(gl, k) for k in ("accuracy", "balanced_accuracy", "macro_f1")]))
        out += ("<h3>Per group</h3><p class=muted>A group's prediction is the mean of its images' probabilities; "
                "brackets: 95% bootstrap intervals that resample groups, not images "
                "(group_predictions.parquet has one row per group).</p>"
                + table(["split", "groups", "mixed labels", "accuracy", "balanced accuracy", "macro-F1"], rows,
                        [False, True, True, True, True, True]))
    return out


def _images_root(run: Path, config: dict | None, images) -> str | None:
    if images is not None:
        return os.fspath(images)
    shards = (config or {}).get("shards")
    if not shards:
        return None
    from shardformat.layout import read_run_summary

    return read_run_summary(shards).get("images_root") or None


def _misclassified(run: Path, thumbs: Thumbnails, missing: list[str], heatmaps: bool = True) -> str:
    path = run / "predictions.parquet"
    if not path.is_file():
        missing.append(path.name)
        return notes(["predictions.parquet is missing (runs trained before it was written): no gallery"])
    import pandas as pd

    try:
        frame = pd.read_parquet(path, columns=["path", "label", "split", "predicted", "probability"])
    except (OSError, ValueError, KeyError) as exc:
        return notes([f"predictions.parquet cannot be read ({exc})"])
    test = frame[frame["split"] == "test"]
    if test.empty:
        return "<p>No test split in this run.</p>"
    wrong = test[test["label"] != test["predicted"]].sort_values(["probability", "path"], ascending=[False, True])
    if wrong.empty:
        return f"<p>All {len(test)} test images are classified correctly.</p>"
    shown = wrong.head(GALLERY)
    overlays, problems = (gallery_overlays(run, shown["path"], thumbs.locate) if heatmaps else
                          ({}, ["heatmaps left out (heatmaps=False)"]))
    tiles = [thumbs.tile(r.path, [f"true <b>{esc(r.label)}</b>", f'predicted <b class="flag">{esc(r.predicted)}</b>',
                                  f"probability {r.probability:.3f}"], overlays.get(r.path))
             for r in shown.itertuples()]
    more = f"<p class=muted>{len(wrong) - GALLERY} more in predictions.parquet</p>" if len(wrong) > GALLERY else ""
    legend = (" Overlays: what the model looked at for its (wrong) prediction (docs/explain.md); the box is the "
              "crop it saw." if overlays else "")
    return (f"<p class=muted>{len(wrong)} of {len(test)} test images misclassified; most confident mistakes "
            f'first.{legend}</p>{notes(problems)}<div class="gallery">{"".join(tiles)}</div>{more}')



@renamed_keywords(run_dir="run")
def write_run_report(run: str | os.PathLike, out: str | os.PathLike | None = None, *,
                     images: str | os.PathLike | None = None, heatmaps: bool = True) -> Path:
    """Write ``report.html`` (default: inside ``run``) describing a training run; returns its path.

    ``heatmaps``: the misclassified gallery shows heatmap overlays (what the model looked at), made with the
    run's backbone when it is complete and its backbone can be found; otherwise plain thumbnails and a note.

    Works on a finished run and on a run being written (``RunWriter.tmp`` before ``commit``), and on runs
    from older versions: whatever file is missing is named in the report.
    """
    run = Path(run).expanduser()
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run directory")
    missing: list[str] = []
    metrics = _read_json(run / "metrics.json", missing) or {}
    config = _read_json(run / "config.json", missing)
    marker = _read_json(run / "run.json", []) or {}
    classes = metrics.get("classes") or _read_json(run / "labels.json", missing) or []
    thumbs = Thumbnails(_images_root(run, config, images))
    shown = next((s for s in ("test", "validation", "train") if isinstance(metrics.get(s), dict)), None)
    m = metrics.get(shown, {}) if shown else {}

    gallery = _misclassified(run, thumbs, missing, heatmaps and marker != {})
    headline = cards([(f"{shown} accuracy" if shown else "accuracy", _fmt(m.get("accuracy")), False),
                      ("macro-F1", _fmt(m.get("macro_f1")), False), ("classes", len(classes), False),
                      ("best epoch", marker.get("best_epoch", "–"), False)])
    facts = [("run", run), ("finished", marker.get("finished", "– (run.json missing: an unfinished run)"))]
    if config:
        hidden = config.get("hidden")
        facts += [("shards", config.get("shards")),
                  ("head", _head_fact(metrics.get("head"), hidden, config)),
                  ("learning rate", config.get("learning_rate")), ("split sizes", config.get("split_sizes")),
                  ("split", config.get("split", "stratified random"))]
    facts = [(k, _fmt(v)) for k, v in facts] + [("images", thumbs.root or "unknown (no thumbnails)")]
    run_notes = list((config or {}).get("notes") or [])
    if missing:
        run_notes.append(f"missing from the run directory: {', '.join(missing)}")
    sections = [
        ("summary", "Summary", headline + notes(run_notes + thumbs.problems())
         + table(["", ""], [(k, v) for k, v in facts])),
        ("metrics", "Metrics", _metrics_table(metrics)),
        ("groups", "Groups", _groups_section(metrics)),
        ("per-class", f"Per class ({shown or 'no split'})", _per_class_table(m)),
        ("confusion", "Confusion matrix", _confusion(run, m, classes)),
        ("calibration", "Calibration", _calibration(run, m)),
        ("curves", "Training curves", figure_file(run / "curves.png", "loss and accuracy per epoch; the dashed "
                                                  "line is the epoch whose weights were kept")),
        ("misclassified", "Misclassified test images", gallery),
    ]
    from stage2_classify.reports.comparison import comparison_section

    tuned = comparison_section(run)  # a fine-tuned run: frozen vs fine-tuned, second on the page
    if tuned is not None:
        sections.insert(1, tuned)
    target = Path(out) if out is not None else run / "report.html"
    return write_html(target, page("Training run report", f"{run.name} · {len(classes)} classes", sections))
