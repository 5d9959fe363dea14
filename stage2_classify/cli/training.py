"""``stage2-classify train``, ``sweep`` and ``cv``: their flags (built from the option dataclasses) and runs."""

from __future__ import annotations

import dataclasses

from hybrid_common import add_options, add_progress_flag
from stage2_classify.cli.common import EPILOG, RAW, add_features_flag
from stage2_classify.options import CVOptions, SweepGrid, TrainOptions

TRAIN_DESCRIPTION = ("Train a dense head on labelled shards; writes model.keras, labels.json, shard_metadata.json, "
                     "config.json, metrics.json, history.json, split.csv, predictions.parquet, curves.png, "
                     "confusion_matrix.png and reliability.png into --out, atomically.")
SWEEP_DESCRIPTION = ("Cross-validates every combination of --hidden x --dropout x --lr (hidden 0: the tuned linear "
                     "head) on the same folds of vectors loaded once, prints and saves a table ranked by the "
                     "cross-validated score with 95%% intervals and the paired difference to the best, and keeps "
                     "the best head, fitted on the train split, as the run directory OUT/best.")
CV_DESCRIPTION = ("Stratified, group-aware K-fold cross-validation on the cached vectors. Writes cv_metrics.json "
                  "(per fold, mean and 95%% interval, pooled) and oof_predictions.parquet (path, content_id, label, "
                  "fold, prob_<class>: every labelled image exactly once).")
CV_TRAIN = ("seed", "hidden", "dropout", "learning_rate", "epochs", "batch_size", "weight_decay", "class_weight")
CV_HELP = {"seed": "seeds the folds (default 0)", "hidden": "the MLP's hidden sizes (default 256)",
           "dropout": "the MLP's (default 0.3)", "learning_rate": "the MLP's Adam learning rate (default 1e-3)",
           "epochs": "the MLP's most epochs per fold (default 50)",
           "class_weight": "auto (default): balanced weights when classes are imbalanced"}
SHARED = tuple(f.name for f in dataclasses.fields(TrainOptions)
               if f.name not in ("head", "hidden", "dropout", "learning_rate"))


def add_parsers(sub) -> None:
    t = sub.add_parser("train", help="train a head and write a run directory (model, metrics, plots)",
                       description=TRAIN_DESCRIPTION, epilog=EPILOG, formatter_class=RAW)
    add_features_flag(t)
    t.add_argument("--out", required=True, help="run directory to write (an earlier run there is replaced)")
    add_options(t, TrainOptions)
    add_progress_flag(t)
    t.set_defaults(handler=run_train)

    s = sub.add_parser("sweep", help="train several heads on vectors loaded once; table ranked by validation score",
                       description=SWEEP_DESCRIPTION, epilog=EPILOG, formatter_class=RAW)
    add_features_flag(s)
    s.add_argument("--out", default=None, help="directory for sweep.csv, sweep.json, sweep.txt and the best run (best/)")
    add_options(s, TrainOptions, only=SHARED)
    add_options(s, SweepGrid)
    add_options(s, CVOptions, only=("folds",))
    add_progress_flag(s)
    s.set_defaults(handler=run_sweep)

    c = sub.add_parser("cv", help="K-fold cross-validation: per-fold metrics and out-of-fold predictions",
                       description=CV_DESCRIPTION, epilog=EPILOG, formatter_class=RAW)
    add_features_flag(c)
    c.add_argument("--out", default=None, help="directory for cv_metrics.json and oof_predictions.parquet")
    add_options(c, CVOptions, only=("folds", "head", "l2"))
    add_options(c, TrainOptions, only=CV_TRAIN, help=CV_HELP)
    add_progress_flag(c)
    c.set_defaults(handler=run_cv)


def _given(args, cls, names=None) -> dict:
    """The parsed values of ``cls``' fields (those this command has flags for)."""
    names = names or [f.name for f in dataclasses.fields(cls)]
    return {n: getattr(args, n) for n in names if hasattr(args, n)}


def run_train(args) -> None:
    from stage2_classify.training.trainer import train

    result = train(args.features, args.out, progress=args.progress, **_given(args, TrainOptions))
    if not args.progress:
        print(result.format())


def run_sweep(args) -> None:
    from stage2_classify.training.sweep import format_table, sweep

    rows = sweep(args.features, args.out, progress=args.progress, **_given(args, TrainOptions, SHARED),
                 **_given(args, SweepGrid), folds=args.folds)
    if not args.progress:
        print(format_table(rows, args.rank_by))


def run_cv(args) -> None:
    from stage2_classify.training.cv import cross_validate

    result = cross_validate(args.features, args.out, progress=args.progress, **_given(args, CVOptions),
                            **_given(args, TrainOptions, CV_TRAIN))
    if not args.progress:
        print(result.format())
