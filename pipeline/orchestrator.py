"""Run stage 1 into a per-backbone feature cache, then stage 2; predict and compare end to end.

Only the stages' public functions and option classes are called here: ``stage1_extract.extract`` /
``ExtractOptions`` and ``stage2_classify.train`` / ``TrainOptions`` / ``Classifier``, plus ``shardformat`` for
the files beside a feature folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

from hybrid_common import renamed_keywords
from shardformat import atomic_write_json, read_json
from shardformat.layout import meta_file, require_file_target, require_folder


@dataclasses.dataclass
class PipelineResult:
    backbone: str
    features_dir: str
    run_dir: str
    extraction: dict[str, Any]
    metrics: dict[str, Any]
    seconds: dict[str, float]

    def format(self) -> str:
        from stage2_classify.evaluation.metrics import format_metric

        test = self.metrics.get("test", {})
        val = self.metrics.get("validation", {})
        ex = self.extraction
        cached = "all cached" if ex.get("extracted", 0) == 0 else f"{ex['extracted']} extracted"
        run = self.run_dir
        lines = [
            f"pipeline done ({self.backbone})",
            f"  stage 1: {cached}, {ex.get('already_done', 0)} already done, {ex.get('errors', 0)} errors "
            f"— {self.seconds['extract']:.1f}s  → {self.features_dir}",
            f"  stage 2: validation {format_metric(val, 'accuracy')}; test {format_metric(test, 'accuracy')}, "
            f"{format_metric(test, 'macro_f1', 'macro-F1')} — {self.seconds['train']:.1f}s",
            *self._stage2_notes(),
            f"  report   {os.path.join(run, 'report.html')}  (metrics, per-class table, calibration, mistakes)",
            f"  model    {os.path.join(run, 'model.keras')}",
            f"  metrics  {os.path.join(run, 'metrics.json')}  (95% bootstrap intervals in [ ])",
            f"  plots    {os.path.join(run, 'curves.png')}, …/confusion_matrix.png, …/reliability.png",
        ]
        return "\n".join(lines)


    def _stage2_notes(self) -> list[str]:
        """The head stage 2 kept, the grouping and its warnings (stage 2's own words)."""
        from stage2_classify.training.heads import describe_choice

        lines = []
        if self.metrics.get("head"):
            lines.append(f"  head     {describe_choice(self.metrics['head'])}")
        groups = self.metrics.get("groups") or {}
        if groups.get("grouped"):
            lines.append(f"  groups   {groups.get('source')}")
        lines += [f"  WARNING  {w}" for w in groups.get("warnings") or []]
        return lines


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "model"


def cache_name(backbone: str | None = None, *, weights: str | os.PathLike | None = None,
               onnx: str | os.PathLike | None = None) -> str:
    """The feature-cache folder name for a backbone: one per backbone and weights, so vectors never mix."""
    from stage1_extract import DEFAULT_BACKBONE

    if onnx is not None:
        digest = hashlib.sha256(Path(onnx).read_bytes()).hexdigest()[:10]
        return f"onnx-{_slug(Path(onnx).stem)}-{digest}"
    name = backbone or DEFAULT_BACKBONE
    if weights is not None:
        digest = hashlib.sha256(Path(weights).read_bytes()).hexdigest()[:10]
        return f"{name}-{digest}"
    return name


def features_dir(workdir: str | os.PathLike, backbone: str | None = None, **kw) -> str:
    return os.path.join(os.fspath(workdir), "features", cache_name(backbone, **kw))


def _options(cls, given, what: str):
    """``given`` as a ``cls`` (an instance, a dict of its fields, or None for the defaults)."""
    if given is None:
        return cls()
    if isinstance(given, cls):
        return given
    if isinstance(given, dict):
        return dataclasses.replace(cls(), **given)
    raise TypeError(f"{what} must be a {cls.__name__} or a dict of its fields, not {type(given).__name__}")


def _extract(images, fdir: str, *, backbone=None, weights=None, onnx=None, input_size=None, progress=True,
             stage1_options=None) -> dict[str, Any]:
    """Stage 1 into ``fdir`` with ``stage1_options`` (an ExtractOptions; None: the defaults) and this cache's
    backbone."""
    from stage1_extract import ExtractOptions, extract

    kwargs = {**(stage1_options or ExtractOptions()).as_kwargs(), "backbone": None if onnx else backbone, "weights": weights,
              "onnx": onnx, "input_size": input_size, "progress": progress}
    summary = extract(images, fdir, **kwargs)  # the engine (local or Ray) is stage 1's choice, from the options
    if progress:
        print(summary.format(), flush=True)
    info = summary.as_dict()
    speed_file = meta_file(fdir, "extraction_speed.json")  # beside the shards, not among them
    Path(fdir, "_extraction_speed.json").unlink(missing_ok=True)  # where older versions kept it, among the shards
    if info.get("extracted", 0) > 0:  # remember the speed of the run that did the work, for compare()
        atomic_write_json(speed_file, {"images_per_second": info["images_per_second"],
                                       "provider": info["provider"], "images": info["extracted"]})
    else:  # only a hint for compare(): a damaged file (disk full earlier) must not stop a run
        remembered = read_json(speed_file, default={})
        if isinstance(remembered, dict) and isinstance(remembered.get("images_per_second"), (int, float)):
            info["images_per_second"] = remembered["images_per_second"]
    return info


#: the stage-1 options that prediction passes on (the backbone itself is the run's own)
PREDICT_STAGE1 = ("engine", "ray_address", "provider", "precision", "batch_size", "workers", "draft")


def _with_engine(stage1_options, engine: str | None, ray_address: str | None):
    """``stage1_options`` with ``engine`` / ``ray_address`` given as keywords (the older spelling) folded in."""
    from stage1_extract import ExtractOptions

    options = _options(ExtractOptions, stage1_options, "stage1_options")
    given = {k: v for k, v in (("engine", engine), ("ray_address", ray_address)) if v is not None}
    return dataclasses.replace(options, **given) if given else options


def _train_options(given):
    from stage2_classify import TrainOptions

    return _options(TrainOptions, given, "train_options")


def run(
    images: str | os.PathLike,
    workdir: str | os.PathLike,
    *,
    backbone: str | None = None,
    weights: str | os.PathLike | None = None,
    onnx: str | os.PathLike | None = None,
    input_size: int | None = None,
    engine: str | None = None,
    ray_address: str | None = None,
    run_name: str | None = None,
    stage1_options=None,
    train_options=None,
    progress: bool = True,
) -> PipelineResult:
    """Stage 1 into ``workdir/features/<backbone>`` (incremental: cached images cost nothing), then stage 2
    into ``workdir/runs/<backbone>/<run_name>``.

    ``stage1_options``: an :class:`stage1_extract.ExtractOptions` or a dict of its fields (``engine``,
    ``provider``, ``batch_size``…); ``train_options``: a :class:`stage2_classify.TrainOptions` or a dict of its
    fields. ``engine`` and ``ray_address`` may also be given here directly.
    """
    import stage2_classify

    require_folder(workdir, "--workdir")
    fdir = features_dir(workdir, backbone, weights=weights, onnx=onnx)
    t0 = time.perf_counter()
    extraction = _extract(images, fdir, backbone=backbone, weights=weights, onnx=onnx, input_size=input_size,
                          progress=progress, stage1_options=_with_engine(stage1_options, engine, ray_address))
    t1 = time.perf_counter()
    run_dir = os.path.join(os.fspath(workdir), "runs", Path(fdir).name, run_name or "latest")
    opts = _train_options(train_options)
    result = stage2_classify.train(fdir, run_dir, progress=progress,
                                   **{f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)})
    t2 = time.perf_counter()
    return PipelineResult(
        backbone=Path(fdir).name,
        features_dir=fdir,
        run_dir=os.fspath(result.run_dir),
        extraction=extraction,
        metrics=result.metrics,
        seconds={"extract": t1 - t0, "train": t2 - t1},
    )


@renamed_keywords(model_dir="run", model="run")
def predict(
    images: str | os.PathLike,
    run: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    features: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    onnx: str | os.PathLike | None = None,
    top_k: int = 3,
    engine: str | None = None,
    ray_address: str | None = None,
    stage1_options=None,
    progress: bool = True,
):
    """New images end to end (one file, a folder or a file list): stage 1 with the run's own backbone, then
    the classifier; returns stage 2's predictions DataFrame (path, predicted, probability, top-k, unknown,
    ood_score, error), also written to ``out`` when given.

    The new images' features are cached in ``features`` (default: stage 2's per-backbone cache), so predicting
    again on the same folder costs only the classifier. ``engine="ray"`` runs the extraction on Ray.
    """
    from stage2_classify import Classifier

    if out is not None:
        require_file_target(out)  # before extracting, not after
    options = _with_engine(stage1_options, engine, ray_address)
    passed = {name: getattr(options, name) for name in PREDICT_STAGE1}
    return Classifier.load(run).predict(images, top_k=top_k, out=out, features=features, weights=weights,
                                        onnx=onnx, progress=progress, **passed)


def compare(
    images: str | os.PathLike,
    backbones: Sequence[str],
    workdir: str | os.PathLike,
    *,
    engine: str | None = None,
    ray_address: str | None = None,
    stage1_options=None,
    train_options=None,
    folds: int = 5,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Extract with each backbone (cached), train the same head on each, cross-validate it, and write a table
    and a bar chart; returns one row per backbone, in the order given, each with its ``rank``.

    Ranking is by ``folds``-fold cross-validated macro-F1 (``stage2_classify.cross_validate`` with the same
    head options and seed, so every backbone gets the same folds of the same images), with its 95% interval,
    the paired difference to the best and whether the two are indistinguishable (the interval holds 0);
    ``folds=0`` skips cross-validation and ranks by validation macro-F1 of the one split. Every backbone is
    also trained and tested on one split: the first backbone's content-keyed split, frozen in its
    ``split.csv`` and passed to the others (or the ``split_file`` in ``train_options``). An entry ending in
    ``.onnx`` is a user model (its input size must be fixed in the model). Writes ``workdir/compare.csv``,
    ``compare.json``, ``compare.txt`` and ``compare.png``.
    """
    rows, cv_results = [], {}
    options = _train_options(train_options)
    stage1 = _with_engine(stage1_options, engine, ray_address)
    for entry in backbones:
        kw = {"onnx": entry} if entry.endswith(".onnx") else {"backbone": entry}
        result = run(images, workdir, stage1_options=stage1, train_options=options, progress=progress, **kw)
        if not options.split_file:
            options = dataclasses.replace(options, split_file=os.path.join(result.run_dir, "split.csv"))
        if folds:
            cv_results[result.backbone] = _cross_validate(result.features_dir, options, folds, progress)
        val, test = result.metrics.get("validation", {}), result.metrics.get("test", {})
        rows.append({
            "backbone": result.backbone,
            "val_accuracy": val.get("accuracy"),
            "val_macro_f1": val.get("macro_f1"),
            "test_accuracy": test.get("accuracy"),
            "test_macro_f1": test.get("macro_f1"),
            "extract_images_per_second": result.extraction.get("images_per_second"),
            "train_seconds": round(result.seconds["train"], 2),
            "run_dir": result.run_dir,
            "split_file": options.split_file,
        })
    rows = _rank(rows, cv_results)
    from pipeline.report import write_comparison

    write_comparison(rows, workdir)
    return rows


def _cross_validate(fdir: str, options, folds: int, progress: bool):
    """The head ``train`` fits, cross-validated on one backbone's features (same folds for every backbone)."""
    from stage2_classify import cross_validate

    keep = ("head", "hidden", "dropout", "learning_rate", "epochs", "batch_size", "weight_decay", "patience",
            "class_weight", "seed", "group_regex", "groups")
    given = {k: getattr(options, k) for k in keep if hasattr(options, k)}
    result = cross_validate(fdir, folds=folds, progress=False, **given)
    if progress:
        print(result.format(), flush=True)
    return result


def _rank(rows: list[dict[str, Any]], cv_results: dict) -> list[dict[str, Any]]:
    """The rows (in the order of ``backbones``) with a ``rank`` and, when cross-validated, the cross-validated
    columns (``ranking.rank_by_cv``); the printed table sorts by rank."""
    if not cv_results:
        order = sorted(range(len(rows)), key=lambda i: -(rows[i]["val_macro_f1"] or 0))
        for rank, i in enumerate(order, 1):
            rows[i]["rank"] = rank
        return rows
    from stage2_classify.training.ranking import rank_by_cv

    ranked = {r["name"]: r for r in rank_by_cv(cv_results)}
    for row in rows:
        r = ranked[row["backbone"]]
        ci, diff = r["cv_macro_f1_ci95"] or [None, None], r["diff_vs_best_ci95"] or [None, None]
        row.update({"rank": r["rank"], "cv_macro_f1": r["cv_macro_f1"], "cv_macro_f1_low": ci[0],
                    "cv_macro_f1_high": ci[1], "diff_vs_best": r["diff_vs_best"], "diff_low": diff[0],
                    "diff_high": diff[1], "indistinguishable_from_best": r["indistinguishable_from_best"]})
    return rows
