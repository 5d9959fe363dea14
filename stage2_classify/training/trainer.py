"""``train()``: load shards → content-keyed split → fit the head with early stopping → metrics, files, model.

The run directory is written atomically (``runs/``); the human summary printed at the end is built here.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from hybrid_common import renamed_keywords
from stage2_classify.backend import check_backend
from stage2_classify.data.dataset import Dataset, load_dataset
from stage2_classify.data.groups import format_groups, group_report, group_source, regroup
from stage2_classify.data.split import split_notes
from stage2_classify.errors import DatasetError
from stage2_classify.evaluation.groups import format_group_metrics, per_group_results, write_group_predictions
from stage2_classify.finetuning.provenance import overlap_notes
from stage2_classify.evaluation.metrics import format_metric, majority_rate
from stage2_classify.options import TrainOptions
from stage2_classify.training.fit import FittedHead, make_split, metrics_by_split, predict_proba, split_info
from stage2_classify.training.heads import describe_choice, fit_head


@dataclasses.dataclass
class TrainResult:
    run_dir: str
    metrics: dict  # per split: accuracy, balanced_accuracy, macro_f1, per_class, ci95, … (see metrics.py)
    history: dict  # per epoch: loss, accuracy, val_loss, val_accuracy
    classes: list[str]
    model: object = dataclasses.field(default=None, repr=False)  # the trained keras.Model (also in run_dir)
    text: str = dataclasses.field(default="", repr=False)

    def format(self) -> str:
        """The human summary printed at the end of training."""
        return self.text

    @property
    def summary(self) -> str:
        return self.format()


def format_summary(ds: Dataset, split, fitted: FittedHead, metrics: dict, run_dir: str, notes: list[str],
             info: dict) -> str:
    n_split = "/".join(str(len(split.get(k, ()))) for k in ("train", "validation", "test"))
    how = (f"frozen split from {info['split_file']}" if info["method"] == "file"
           else f"{'group' if (metrics.get('groups') or {}).get('grouped') else 'content'}-keyed split, "
                f"seed {info['seed']}")
    lines = [
        f"stage 2 done: {run_dir}",
        f"  data       {len(ds.y)} labelled vectors ({ds.metadata.backbone}, {ds.features.shape[1]}-d), "
        f"{len(ds.classes)} classes; train/val/test {n_split} ({how})"
        + (f"; {ds.unlabelled} unlabelled row{'s' if ds.unlabelled != 1 else ''} left out" if ds.unlabelled else ""),
        f"  head       {describe_choice(fitted.choice)}",
        "  training   " + (f"MLP {len(fitted.history.get('loss', []))} epochs, best epoch {fitted.best_epoch} "
                           f"(weights restored, batch {(fitted.choice or {}).get('mlp', {}).get('batch_size')}); "
                           if fitted.history.get("loss") else "")
        + f"{fitted.seconds:.1f}s in all"
        + ("; balanced class weights (classes are imbalanced)" if fitted.class_weight else ""),
    ]
    for name in ("validation", "test"):
        if name in metrics:
            m = metrics[name]
            lines.append(f"  {name:11s}" + "  ".join(format_metric(m, k, label) for k, label in (
                ("accuracy", None), ("balanced_accuracy", "balanced"), ("macro_f1", "macro-F1"))) + f"  (n={m['n']})")
    if "test" in metrics:
        m = metrics["test"]
        lines.append("  test       " + "  ".join(
            f"{label} {m[k]:.3f}" for k, label in (("roc_auc_ovr", "ROC AUC"), ("log_loss", "log-loss"), ("ece", "ECE"))
            if m.get(k) is not None) + "  (95% bootstrap intervals in [ ])")
        lines.append(f"  baseline   majority-class rate on test {majority_rate(ds.y[split['test']]):.3f}")
    if ds.duplicate_rows_dropped:
        lines.append(f"  note       {ds.duplicate_rows_dropped} shard rows repeated a path and were read once "
                     "(rerun stage1-extract to repair the shards)")
    lines += [f"  note       {note}" for note in notes]
    lines.append("  files      report.html (open it in a browser), model.keras, metrics.json, predictions.parquet, "
                 "split.csv, curves.png, confusion_matrix.png, reliability.png")
    return "\n".join(lines)


@renamed_keywords(shards="features")
def train(
    features: str | os.PathLike,
    out: str | os.PathLike,
    *,
    head: str = TrainOptions.head,
    hidden: Sequence[int] = TrainOptions.hidden,
    dropout: float = TrainOptions.dropout,
    learning_rate: float = TrainOptions.learning_rate,
    epochs: int = TrainOptions.epochs,
    batch_size: int = TrainOptions.batch_size,
    weight_decay: float = TrainOptions.weight_decay,
    patience: int = TrainOptions.patience,
    seed: int = TrainOptions.seed,
    val_fraction: float = TrainOptions.val_fraction,
    test_fraction: float = TrainOptions.test_fraction,
    class_weight: str = TrainOptions.class_weight,
    split_file: str | os.PathLike | None = TrainOptions.split_file,
    group_regex: str | None = TrainOptions.group_regex,
    groups: str | os.PathLike | None = TrainOptions.groups,
    matmul_precision: str = TrainOptions.matmul_precision,
    dataset: Dataset | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a head on the feature folder ``features`` and write a complete run directory ``out`` atomically.

    The split is keyed by content (``split_file``: a run's ``split.csv`` to reuse its split exactly); see
    :class:`~stage2_classify.TrainOptions` for the other parameters (the keyword defaults are its defaults).
    ``progress`` shows Keras' progress and prints the summary (``result.format()``). Pass
    ``dataset=load_dataset(features)`` to reuse vectors already in memory.
    """
    opts = TrainOptions(head=head, hidden=hidden, dropout=dropout, learning_rate=learning_rate, epochs=epochs,
                        batch_size=batch_size, weight_decay=weight_decay, patience=patience, seed=seed,
                        val_fraction=val_fraction,
                        test_fraction=test_fraction, class_weight=class_weight, split_file=split_file,
                        group_regex=group_regex, groups=groups, matmul_precision=matmul_precision)
    return train_with_options(features, out, opts, dataset=dataset, progress=progress)


@renamed_keywords(shards="features")
def train_with_options(features, out, opts: TrainOptions, *, dataset: Dataset | None = None,
                       progress: bool = True) -> TrainResult:
    """:func:`train` with the options as one :class:`TrainOptions` (used by ``sweep`` and ``pipeline``)."""
    from stage2_classify.runs.files import write_run
    from stage2_classify.runs.writer import RunWriter

    check_backend()  # before minutes of loading, not after
    ds = dataset if dataset is not None else load_dataset(features)
    ds = regroup(ds, group_regex=opts.group_regex, groups=opts.groups)
    split = make_split(ds, opts)
    if len(split["train"]) == 0:
        raise DatasetError(f"{os.fspath(features)}: no training rows after the split")
    notes = split_notes(ds.y, ds.classes, split, ds.content_ids, ds.groups, from_file=bool(opts.split_file))
    notes += overlap_notes(ds.metadata, ds.content_ids, split)  # vectors of a fine-tuned backbone
    grouping = group_report(ds, split, group_source(ds, group_regex=opts.group_regex, groups=opts.groups))
    fitted = fit_head(ds, split, opts, progress=progress)
    proba = predict_proba(fitted.model, ds.features)
    metrics = metrics_by_split(ds, proba, split, seed=opts.seed)
    metrics["majority_rate_test"] = majority_rate(ds.y[split["test"]]) if len(split["test"]) else None
    metrics["classes"] = ds.classes
    metrics["head"] = fitted.choice
    metrics["groups"] = grouping
    by_group = per_group_results(ds, proba, split, seed=opts.seed) if grouping["grouped"] else None
    if by_group:
        metrics["by_group"] = by_group["metrics"]
    info = split_info(opts)
    writer = RunWriter(out)
    try:
        if by_group:  # before the run is committed: group_predictions.parquet is one of its files
            write_group_predictions(by_group["table"], writer.path("group_predictions.parquet"))
        final = write_run(writer, shards=features, ds=ds, split=split, notes=notes, opts=opts, fitted=fitted,
                          metrics=metrics, proba=proba, split_info=info)
    except BaseException:
        writer.discard()
        raise
    text = format_summary(ds, split, fitted, metrics, str(final), notes, info)
    head, files = text.rsplit("\n", 1)
    files += ", group_predictions.parquet" if by_group else ""
    text = "\n".join([head, *format_groups(grouping), *format_group_metrics(metrics.get("by_group")), files])
    if progress:
        print(text, flush=True)
    return TrainResult(str(final), metrics, fitted.history, ds.classes, fitted.model, text)
