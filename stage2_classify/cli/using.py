"""``stage2-classify evaluate``, ``predict`` and ``export``: using a trained run."""

from __future__ import annotations

from hybrid_common import add_options, add_progress_flag
from stage2_classify.cli.common import EPILOG, RAW, add_features_flag, add_run_flag
from stage1_extract.options import ExtractOptions
from stage2_classify.options import PredictOptions, TrainOptions

GROUP_HELP = {"group_regex": "per-group results: a regex with one capture group searched in each path (e.g. "
                             r"'(patient\d+)'); default: the shards' groups, or the run's own --group-regex",
              "groups": "per-group results: a CSV/Parquet file with columns path,group"}

EVALUATE_DESCRIPTION = ("Accuracy, balanced accuracy, macro-F1, per-class precision/recall/specificity/F1, ROC AUC, "
                        "log-loss, calibration and 95%% bootstrap intervals of a trained run on every labelled row "
                        "of --features. Warns when those images overlap the run's training or validation split.")
PREDICT_DESCRIPTION = ("Predicts on images (one file, a folder, a file list: features are extracted with the run's "
                       "own backbone into a per-backbone cache, or into --features) or on a feature folder. Writes "
                       "path, label (when known), predicted, probability, top1_label/top1_probability…, unknown, "
                       "ood_score and error. Refuses shards made by another backbone, weights or preprocessing.")
EXPORT_DESCRIPTION = ("Merges the run's backbone (stage 1's verified ONNX export) and head into one ONNX model, "
                      "verifies it against the two-stage path and writes it. Input: uint8 N×S×S×3 RGB, resized "
                      "(shorter side) and centre-cropped as metadata_props['preprocessing'] says; outputs: "
                      "probabilities (labels in metadata_props['labels']) and ood_score.")


def add_parsers(sub) -> None:
    e = sub.add_parser("evaluate", help="metrics of a trained run on labelled shards",
                       description=EVALUATE_DESCRIPTION)
    add_features_flag(e)
    add_run_flag(e)
    e.add_argument("--out", default=None, help="also write the metrics as JSON here")
    add_options(e, TrainOptions, only=("group_regex", "groups"), help=GROUP_HELP)
    add_progress_flag(e)
    e.set_defaults(handler=run_evaluate)

    p = sub.add_parser("predict", help="predicted class, top-k and an 'unknown' flag for images or shards",
                       description=PREDICT_DESCRIPTION, epilog=EPILOG, formatter_class=RAW)
    p.add_argument("--images", help="an image file, a folder (flat or class folders) or a CSV/TSV/Parquet "
                   "file list with a 'path' column")
    add_features_flag(p, required=False, help="a feature folder (or URI) to predict on (labels not needed); with "
                      "--images: where to cache their features (default: a per-backbone cache under "
                      "$HYBRID_TRANSFER_CACHE or ~/.cache/hybrid-transfer)")
    add_run_flag(p)
    p.add_argument("--out", required=True, help="output file: Parquet, or CSV when the name ends in .csv")
    add_options(p, PredictOptions)
    add_options(p, TrainOptions, only=("group_regex", "groups"),
                help={k: v.replace("per-group results", "also write OUT's name + .groups (one row per group: "
                                   "mean probability of its images; implies --all-probabilities)")
                      .replace("; default: the shards' groups, or the run's own --group-regex", "")
                      for k, v in GROUP_HELP.items()})
    # the backbone's flags are stage 1's own (one definition of each, choices included)
    add_options(p, ExtractOptions, only=("weights", "onnx", "provider", "batch_size"),
                help={"weights": "with --images: the --weights file the run's backbone used",
                      "onnx": "with --images: the user ONNX model the run was trained on",
                      "provider": "with --images: where stage 1 runs the backbone (auto: CUDA when usable)",
                      "batch_size": "with --images: stage 1's inference batch size"})
    add_progress_flag(p)
    p.set_defaults(handler=run_predict, check=check_predict)

    x = sub.add_parser("export", help="one ONNX file from uint8 pixels to class probabilities (and ood_score)",
                       description=EXPORT_DESCRIPTION)
    add_run_flag(x)
    x.add_argument("--out", required=True, help="the .onnx file to write")
    x.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                   help="fp16: the backbone in half precision, for GPUs (default fp32)")
    x.add_argument("--images", default=None, help="real images to verify the export on (a file, folder or list; "
                   "up to 64 are used); without it, random pixels")
    x.add_argument("--weights", default=None, help="the --weights file the run's backbone used, if any")
    x.add_argument("--onnx", default=None, help="the user ONNX model the run was trained on, if any")
    x.add_argument("--heatmap", action="store_true", help="add a 'heatmap' output (N×S×S over the input crop, "
                   "in [0, 1]) of what the predicted class looked at, computed in the graph (docs/explain.md)")
    x.set_defaults(handler=run_export)


def check_predict(parser, args) -> None:
    if not args.images and not args.features:
        parser.error("one of the arguments --images --features (--shards) is required")


def run_evaluate(args) -> None:
    from stage2_classify.evaluation.evaluate import evaluate

    print(evaluate(args.features, args.run, args.out, group_regex=args.group_regex, groups=args.groups,
                   progress=False).format())


def run_predict(args) -> None:
    from stage2_classify.inference import few
    from stage2_classify.inference.predict import predict, prediction_summary

    if args.images and few.wanted([args.images], features=args.features, provider=args.provider):
        # one image: no Keras, no worker processes, no feature cache (inference/few.py)
        from stage2_classify.inference.classifier import write_predictions

        frame = few.predict_few([args.images], args.run, top_k=args.top_k, all_probabilities=args.all_probabilities,
                                weights=args.weights, onnx=args.onnx, progress=args.progress)
        if frame is not None:
            write_predictions(frame, args.out)
            print(prediction_summary(frame, args.out))
            return
    source = args.images or args.features
    stage1 = {"provider": args.provider, "batch_size": args.batch_size} if args.images else {}
    grouped = args.group_regex is not None or args.groups is not None
    frame = predict(source, args.run, args.out, top_k=args.top_k,
                    all_probabilities=args.all_probabilities or grouped,
                    features=args.features if args.images else None, weights=args.weights, onnx=args.onnx,
                    progress=args.progress, **stage1)
    print(prediction_summary(frame, args.out))
    if grouped:
        print(write_group_table(frame, args.out, group_regex=args.group_regex, groups=args.groups))


def write_group_table(frame, out: str, *, group_regex=None, groups=None) -> str:
    """``OUT.groups.parquet`` (or ``.csv``): one row per group, the mean of its images' probabilities."""
    import os

    import pandas as pd

    from shardformat import atomic_write_text, atomic_write_via_path
    from stage2_classify.evaluation.groups import predictions_by_group

    mapping = None
    if groups is not None:
        table = pd.read_parquet(groups) if str(groups).endswith(".parquet") else pd.read_csv(groups, dtype=str)
        mapping = dict(zip(table["path"].astype(str), table["group"]))
    by_group = predictions_by_group(frame, groups=mapping, group_regex=group_regex)
    stem, ext = os.path.splitext(os.fspath(out))
    target = f"{stem}.groups{ext if ext == '.csv' else '.parquet'}"
    if target.endswith(".csv"):
        atomic_write_text(target, by_group.to_csv(index=False))
    else:
        atomic_write_via_path(target, lambda tmp: by_group.to_parquet(tmp, index=False))
    return f"{len(by_group)} groups written to {target} (mean probability over each group's images)"


def run_export(args) -> None:
    from stage2_classify.inference.classifier import Classifier
    from stage2_classify.inference.export import export

    print(export(Classifier.load(args.run), args.out, precision=args.precision, images=args.images,
                 weights=args.weights, onnx=args.onnx, heatmap=args.heatmap).format())
