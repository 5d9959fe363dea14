"""``stage2-classify``: train / evaluate / predict / sweep / cv on feature shards.

Keras and torch are imported only once a command runs, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  stage2-classify train    --shards work/features/efficientnet_lite0 --out work/runs/first
  stage2-classify train    --shards feats --out runs/linear --hidden 0
  stage2-classify train    --shards feats --out runs/deep --hidden 512x256 --dropout 0.4 --lr 3e-4
  stage2-classify evaluate --shards other_feats --model work/runs/first --out metrics.json
  stage2-classify predict  --shards new_feats --model work/runs/first --out predictions.csv
  stage2-classify predict  --images photo.jpg --model work/runs/first --out predictions.csv --top-k 5
  stage2-classify export   --model work/runs/first --out model.onnx --images data/animal_mnist
  stage2-classify sweep    --shards feats --out sweeps/a --hidden 0,256,512,512x256 --dropout 0.2,0.4
  stage2-classify cv       --shards feats --out cv/a --folds 5
  stage2-classify train    --shards other_backbone_feats --out runs/b --split-file work/runs/first/split.csv
  stage2-classify doctor   --shards feats --out doctor --run work/runs/first
"""


def _hidden(text: str) -> tuple[int, ...]:
    """'512' → (512,), '512x256' → (512, 256), '0' / 'linear' → () (a linear head)."""
    text = text.strip().lower()
    if text in ("", "0", "none", "linear"):
        return ()
    try:
        sizes = tuple(int(p) for p in text.split("x") if p)
    except ValueError:
        raise argparse.ArgumentTypeError(f"hidden sizes look like 512, 512x256 or 0 (linear), not {text!r}") from None
    if any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"hidden sizes must be positive: {text!r}")
    return sizes


parse_hidden = _hidden  # public: the pipeline CLI uses this very parser


def _list(kind):
    def parse(text: str):
        values = [kind(p) for p in text.split(",") if p.strip()]
        if not values:
            raise argparse.ArgumentTypeError("give at least one value")
        return values
    parse.__name__ = f"comma-separated {getattr(kind, '__name__', 'value')}"
    return parse


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"a fraction in [0, 1), not {text}")
    return value


def _common_training(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", required=True, help="directory (or URI) of stage-1 feature shards")
    p.add_argument("--epochs", type=int, default=50, help="maximum epochs; early stopping usually ends sooner "
                   "(default 50)")
    p.add_argument("--batch-size", type=int, default=256, help="default 256")
    p.add_argument("--patience", type=int, default=5,
                   help="epochs without a better validation loss before stopping; the best weights are restored "
                   "(default 5)")
    p.add_argument("--seed", type=int, default=0, help="seeds the split and the training: same seed, same numbers")
    p.add_argument("--val-fraction", type=_fraction, default=0.15,
                   help="share of images (or groups) for validation (default 0.15)")
    p.add_argument("--test-fraction", type=_fraction, default=0.15,
                   help="share of images (or groups) for test (default 0.15)")
    p.add_argument("--split-file", default=None,
                   help="freeze the split: a run's split.csv (matched by content_id, then path), or CSV/Parquet "
                   "with columns path,split (train/val/test); instead of the content-keyed split")
    p.add_argument("--class-weight", choices=["auto", "balanced", "none"], default="auto",
                   help="auto (default): balanced weights when the largest class is more than 1.5x the smallest")
    p.add_argument("--matmul-precision", choices=["highest", "high", "medium"], default="highest",
                   help="highest (default): float32. medium: bfloat16 matmuls on CPUs with AVX512-BF16/AMX "
                   "(~2.5x faster there), TF32 on NVIDIA GPUs")
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress (the summary is still printed)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stage2-classify",
        description="Train, evaluate and use a Keras dense classifier (torch backend) on cached feature shards.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{train,evaluate,predict,export,sweep,cv,doctor}")
    t = sub.add_parser("train", help="train a head and write a run directory (model, metrics, plots)",
                       description="Train a dense head on labelled shards; writes model.keras, labels.json, "
                       "shard_metadata.json, config.json, metrics.json, history.json, split.csv, "
                       "predictions.parquet, curves.png, confusion_matrix.png and reliability.png into --out, "
                       "atomically.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _common_training(t)
    t.add_argument("--out", required=True, help="run directory to write (an earlier run there is replaced)")
    t.add_argument("--hidden", type=_hidden, default=(256,),
                   help="hidden layer sizes: 256 (default), 512x256 for two layers, 0 for a linear head")
    t.add_argument("--dropout", type=float, default=0.3, help="after each hidden layer (default 0.3)")
    t.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")

    e = sub.add_parser("evaluate", help="metrics of a trained run on labelled shards",
                       description="Accuracy, balanced accuracy, macro-F1, per-class precision/recall/"
                       "specificity/F1, ROC AUC, log-loss, calibration and 95%% bootstrap intervals of a trained run "
                       "on every labelled row of --shards. Warns when those images overlap the run's training or "
                       "validation split.")
    e.add_argument("--shards", required=True, help="directory (or URI) of labelled feature shards")
    e.add_argument("--model", required=True, help="run directory written by train")
    e.add_argument("--out", default=None, help="also write the metrics as JSON here")

    p = sub.add_parser("predict", help="predicted class, top-k and an 'unknown' flag for images or shards",
                       description="Predicts on images (one file, a folder, a file list: features are extracted "
                       "with the run's own backbone into a per-backbone cache) or on feature shards. Writes path, "
                       "label (when known), predicted, probability, top1_label/top1_probability…, unknown, "
                       "ood_score and error. Refuses shards made by another backbone, weights or preprocessing.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="an image file, a folder (flat or class folders) or a CSV/TSV/Parquet "
                        "file list with a 'path' column")
    source.add_argument("--shards", help="directory (or URI) of feature shards (labels not needed)")
    p.add_argument("--model", required=True, help="run directory written by train")
    p.add_argument("--out", required=True, help="output file: Parquet, or CSV when the name ends in .csv")
    p.add_argument("--top-k", type=int, default=3, help="labels and probabilities of the k likeliest classes "
                   "(default 3)")
    p.add_argument("--all-probabilities", action="store_true", help="also one prob_<class> column per class")
    p.add_argument("--features", default=None, help="with --images: where to cache their features (default: "
                   "a per-backbone cache under $HYBRID_TRANSFER_CACHE or ~/.cache/hybrid-transfer)")
    p.add_argument("--weights", default=None, help="with --images: the --weights file the run's backbone used")
    p.add_argument("--onnx", default=None, help="with --images: the user ONNX model the run was trained on")
    p.add_argument("--provider", choices=["auto", "cuda", "cpu", "tensorrt"], default="auto",
                   help="with --images: where stage 1 runs the backbone (default auto: CUDA when usable)")
    p.add_argument("--batch-size", type=int, default=None, help="with --images: stage 1's inference batch size")
    p.add_argument("--no-progress", action="store_true", help="no extraction progress bar or notes")

    x = sub.add_parser("export", help="one ONNX file from uint8 pixels to class probabilities (and ood_score)",
                       description="Merges the run's backbone (stage 1's verified ONNX export) and head into one "
                       "ONNX model, verifies it against the two-stage path and writes it. Input: uint8 "
                       "N×S×S×3 RGB, resized (shorter side) and centre-cropped as metadata_props['preprocessing'] "
                       "says; outputs: probabilities (labels in metadata_props['labels']) and ood_score.")
    x.add_argument("--model", required=True, help="run directory written by train")
    x.add_argument("--out", required=True, help="the .onnx file to write")
    x.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                   help="fp16: the backbone in half precision, for GPUs (default fp32)")
    x.add_argument("--images", default=None, help="real images to verify the export on (a file, folder or list; "
                   "up to 64 are used); without it, random pixels")
    x.add_argument("--weights", default=None, help="the --weights file the run's backbone used, if any")
    x.add_argument("--onnx", default=None, help="the user ONNX model the run was trained on, if any")

    s = sub.add_parser("sweep", help="train several heads on vectors loaded once; table ranked by validation score",
                       description="Trains every combination of --hidden x --dropout x --lr on one split of "
                       "vectors loaded once, prints and saves a table ranked by validation score, and keeps the "
                       "best head as the run directory OUT/best.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common_training(s)
    s.add_argument("--out", default=None, help="directory for sweep.csv, sweep.json, sweep.txt and the best run (best/)")
    s.add_argument("--hidden", type=_list(_hidden), default=[(), (256,), (512,)],
                   help="comma-separated hidden configs (default 0,256,512; 0 = linear, 512x256 = two layers)")
    s.add_argument("--dropout", type=_list(float), default=[0.3], help="comma-separated, e.g. 0.2,0.4 (default 0.3)")
    s.add_argument("--lr", type=_list(float), default=[1e-3], help="comma-separated, e.g. 1e-3,3e-4 (default 1e-3)")
    s.add_argument("--rank-by", "--sort-by", dest="rank_by",
                   choices=["val_macro_f1", "val_balanced_accuracy", "val_accuracy", "val_loss"],
                   default="val_macro_f1",
                   help="validation score that ranks the heads and picks the kept one (default val_macro_f1: "
                   "accuracy flatters heads that ignore small classes; ties broken by macro-F1)")

    c = sub.add_parser("cv", help="K-fold cross-validation: per-fold metrics and out-of-fold predictions",
                       description="Stratified, group-aware K-fold cross-validation on the cached vectors. Writes "
                       "cv_metrics.json (per fold, mean and 95%% interval, pooled) and oof_predictions.parquet "
                       "(path, content_id, label, fold, prob_<class>: every labelled image exactly once).",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--shards", required=True, help="directory (or URI) of labelled feature shards")
    c.add_argument("--out", default=None, help="directory for cv_metrics.json and oof_predictions.parquet")
    c.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    c.add_argument("--seed", type=int, default=0, help="seeds the folds (default 0)")
    c.add_argument("--head", choices=["linear", "train"], default="linear",
                   help="linear (default): fast logistic regression, seconds on 50k vectors; train: the Keras "
                   "head of 'train' (--hidden, --dropout, --lr, --epochs), minutes")
    c.add_argument("--l2", type=float, default=1e-3, help="--head linear: L2 penalty on the mean log-loss (default 1e-3)")
    c.add_argument("--hidden", type=_hidden, default=(256,), help="--head train: hidden sizes (default 256)")
    c.add_argument("--dropout", type=float, default=0.3, help="--head train (default 0.3)")
    c.add_argument("--lr", type=float, default=1e-3, help="--head train: Adam learning rate (default 1e-3)")
    c.add_argument("--epochs", type=int, default=50, help="--head train: most epochs per fold (default 50)")
    c.add_argument("--class-weight", choices=["auto", "balanced", "none"], default="auto")
    c.add_argument("--quiet", action="store_true", help="no per-fold progress (the summary is still printed)")
    _doctor_parser(sub)
    return parser


def _doctor_parser(sub) -> None:
    from stage2_classify.quality import NEAR_THRESHOLD, NEIGHBOURS, OUTLIER_Z

    d = sub.add_parser("doctor", help="find likely label mistakes, duplicates, split leakage and outliers",
                       description="Checks labelled shards for likely-mislabelled images (confident learning on "
                       "out-of-fold probabilities), exact and near-duplicates (and those across splits), and "
                       "outliers; writes label_issues.csv, duplicates.csv, outliers.csv, doctor.json and a "
                       "self-contained report.html into --out.")
    d.add_argument("--shards", required=True, help="directory (or URI) of labelled feature shards")
    d.add_argument("--out", required=True, help="folder for the findings and report.html")
    d.add_argument("--images", default=None, help="image root for thumbnails (default: the root stage 1 recorded)")
    d.add_argument("--oof", default=None, help="out-of-fold probabilities (Parquet/CSV: path, prob_<class>…) "
                   "instead of running cross-validation")
    d.add_argument("--run", default=None, help="a training run whose split is checked for leakage")
    d.add_argument("--split-file", default=None, help="CSV/Parquet with columns path,split, for the leakage check")
    d.add_argument("--near-threshold", type=float, default=NEAR_THRESHOLD,
                   help=f"cosine similarity for near-duplicates (default {NEAR_THRESHOLD})")
    d.add_argument("--neighbours", type=int, default=NEIGHBOURS,
                   help=f"nearest neighbours per image (default {NEIGHBOURS})")
    d.add_argument("--outlier-z", type=float, default=OUTLIER_Z,
                   help=f"robust z-score an outlier must reach (default {OUTLIER_Z})")
    d.add_argument("--folds", type=int, default=5, help="cross-validation folds when --oof is not given (default 5)")
    d.add_argument("--seed", type=int, default=0, help="seeds the cross-validation and the map (default 0)")
    d.add_argument("--backend", choices=["auto", "exact", "usearch"], default="auto",
                   help="neighbour search: exact blocked products, or usearch's approximate index (default auto: "
                   "exact up to 300,000 rows)")
    d.add_argument("--no-report", action="store_true", help="write the CSV and JSON files only")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import stage2_classify as s2
    from shardformat import ShardFormatError

    try:
        if args.command in ("train", "sweep"):
            options = dict(epochs=args.epochs, batch_size=args.batch_size, patience=args.patience, seed=args.seed,
                           val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                           class_weight=args.class_weight, split_file=args.split_file,
                           matmul_precision=args.matmul_precision)
            if args.command == "train":
                result = s2.train(args.shards, args.out, progress=not args.quiet, hidden=args.hidden,
                                  dropout=args.dropout, learning_rate=args.lr, **options)
                if args.quiet:
                    print(result.format())
            else:
                s2.sweep(args.shards, args.out, hidden=args.hidden, dropout=args.dropout, learning_rate=args.lr,
                         rank_by=args.rank_by, progress=True, **options)
        elif args.command == "cv":
            result = s2.cross_validate(args.shards, args.out, folds=args.folds, seed=args.seed, head=args.head,
                                       l2=args.l2, hidden=args.hidden, dropout=args.dropout,
                                       learning_rate=args.lr, epochs=args.epochs, class_weight=args.class_weight,
                                       progress=not args.quiet)
            if args.quiet:
                print(result.format())
        elif args.command == "doctor":
            from stage2_classify.doctor import doctor

            result = doctor(args.shards, args.out, images=args.images, oof=args.oof, run=args.run,
                            split_file=args.split_file, near_threshold=args.near_threshold,
                            neighbours=args.neighbours, outlier_z=args.outlier_z, folds=args.folds, seed=args.seed,
                            backend=args.backend, report=not args.no_report, progress=True)
            print(result.format())
        elif args.command == "evaluate":
            print(s2.evaluate(args.shards, args.model, args.out).format())
        elif args.command == "predict":
            frame = s2.predict(args.images or args.shards, args.model, args.out, top_k=args.top_k,
                               all_probabilities=args.all_probabilities, features_dir=args.features,
                               weights=args.weights, onnx=args.onnx, progress=not args.no_progress,
                               **({"provider": args.provider, "batch_size": args.batch_size} if args.images else {}))
            print(_prediction_summary(frame, args.out))
        else:
            from stage2_classify.export_onnx import export

            print(export(s2.Classifier.load(args.model), args.out, precision=args.precision, images=args.images,
                         weights=args.weights, onnx=args.onnx).format())
    except KeyboardInterrupt:
        print("interrupted: nothing half-written was left behind", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError, ShardFormatError) as exc:
        print(f"stage2-classify: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _prediction_summary(frame, out) -> str:
    done = frame["predicted"].notna()
    text = f"{int(done.sum())} predictions written to {out}"
    if frame["unknown"].notna().any():
        text += f"; {int(frame['unknown'].fillna(False).sum())} flagged unknown (unlike the training data)"
    else:
        text += "; the 'unknown' flag is unavailable for this run (see the note above)"
    if (~done).any():
        text += f"; {int((~done).sum())} inputs could not be used (see the 'error' column)"
    return text
