"""``stage2-classify train``, ``sweep`` and ``cv``: their flags (built from the option dataclasses) and runs."""

from __future__ import annotations

import dataclasses

from hybrid_common import add_options, add_progress_flag
from stage2_classify.cli.common import EPILOG, RAW, add_features_flag
from stage2_classify.options import CVOptions, SweepGrid, TrainOptions

TRAIN_DESCRIPTION = ("Train a dense head on labelled shards; writes model.keras, labels.json, shard_metadata.json, "
                     "config.json, metrics.json, history.json, split.csv, predictions.parquet, curves.png, "
                     "confusion_matrix.png and reliability.png into --out, atomically.")
SWEEP_DESCRIPTION = ("Trains every combination of --hidden x --dropout x --lr on one split of vectors loaded once, "
                     "prints and saves a table ranked by validation score, and keeps the best head as the run "
                     "directory OUT/best.")
CV_DESCRIPTION = ("Stratified, group-aware K-fold cross-validation on the cached vectors. Writes cv_metrics.json "
                  "(per fold, mean and 95%% interval, pooled) and oof_predictions.parquet (path, content_id, label, "
                  "fold, prob_<class>: every labelled image exactly once).")
CV_HELP = {"seed": "seeds the folds (default 0)", "hidden": "--head train: hidden sizes (default 256)",
           "dropout": "--head train (default 0.3)", "learning_rate": "--head train: Adam learning rate (default 1e-3)",
           "epochs": "--head train: most epochs per fold (default 50)",
           "class_weight": "auto (default): balanced weights when classes are imbalanced"}
SHARED = tuple(f.name for f in dataclasses.fields(TrainOptions) if f.name not in ("hidden", "dropout", "learning_rate"))


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
    add_progress_flag(s)
    s.set_defaults(handler=run_sweep)

    c = sub.add_parser("cv", help="K-fold cross-validation: per-fold metrics and out-of-fold predictions",
                       description=CV_DESCRIPTION, epilog=EPILOG, formatter_class=RAW)
    add_features_flag(c)
    c.add_argument("--out", default=None, help="directory for cv_metrics.json and oof_predictions.parquet")
    add_options(c, CVOptions, only=("folds", "head", "l2"))
    add_options(c, TrainOptions, only=("seed", "hidden", "dropout", "learning_rate", "epochs", "class_weight"),
                help=CV_HELP)
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
                 **_given(args, SweepGrid))
    if not args.progress:
        print(format_table(rows, args.rank_by))


def run_cv(args) -> None:
    from stage2_classify.training.cv import cross_validate

    result = cross_validate(args.features, args.out, progress=args.progress, **_given(args, CVOptions),
                            **_given(args, TrainOptions, ("seed", "hidden", "dropout", "learning_rate", "epochs",
                                                          "class_weight")))
    if not args.progress:
        print(result.format())
