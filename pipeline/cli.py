"""``pipeline``: run / predict / compare from the command line (heavy imports stay inside the commands).

No flag is defined here that a stage defines: stage-1 flags come from :class:`stage1_extract.ExtractOptions`,
training flags from :class:`stage2_classify.TrainOptions`, prediction flags from ``PredictOptions``, so their
defaults, choices and help texts are the stages' own (``docs/glossary.md``).
"""

from __future__ import annotations

import argparse
import sys

from hybrid_common import add_options, add_progress_flag, options_from_args
from stage1_extract.options import ExtractOptions
from stage2_classify.options import CVOptions, PredictOptions, TrainOptions

#: the stage-1 flags every command takes (the backbone flags are per command: predict reads them from the run)
STAGE1 = ("engine", "ray_address", "provider", "precision", "batch_size", "workers", "draft")
#: the training flags of run and compare; the batch size is spelt --train-batch-size beside stage 1's --batch-size
TRAIN = ("head", "hidden", "dropout", "learning_rate", "epochs", "batch_size", "weight_decay", "seed", "class_weight",
         "val_fraction", "test_fraction", "split_file", "group_regex", "groups")
TRAIN_FLAGS = {"batch_size": "--train-batch-size"}
#: stage 1's grouping flags that run and compare pass on (--group-regex and --groups regroup in stage 2: no
#: re-extraction when they change)
STAGE1_GROUPS = ("dicom_group",)

EPILOG = """examples:
  pipeline run --images data/animal_mnist --workdir work/demo
  pipeline run --images data/animal_mnist --workdir work/demo --hidden 256 --dropout 0.2  # retrain only
  pipeline predict --images new/ --run work/demo/runs/efficientnet_lite0/latest --out preds.csv
  pipeline compare --images data/animal_mnist --workdir work/cmp --backbones efficientnet_lite0,efficientnet_lite1
(--model is the old spelling of --run; it still works)
"""


def _stage1_flags(p: argparse.ArgumentParser, *, backbone: bool) -> None:
    g = p.add_argument_group("stage 1 (extraction)")
    if backbone:
        add_options(g, ExtractOptions, only=("backbone", "weights", "onnx", "input_size"))
    add_options(g, ExtractOptions, only=STAGE1)


def _train_flags(p: argparse.ArgumentParser) -> None:
    add_options(p.add_argument_group("groups (patients)"), ExtractOptions, only=STAGE1_GROUPS)
    g = p.add_argument_group("stage 2 (classifier)")
    add_options(g, TrainOptions, only=TRAIN, flags=TRAIN_FLAGS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline",
        description="Run the two stages in order: extract features (cached per backbone), then train a classifier.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="extract (incremental) then train", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--images", required=True, help="class-folder tree or CSV/Parquet list")
    r.add_argument("--workdir", required=True, help="holds features/<backbone>/ and runs/<backbone>/<name>/")
    r.add_argument("--run-name", default=None, help="name of the training run folder (default: latest)")
    _stage1_flags(r, backbone=True)
    _train_flags(r)
    add_progress_flag(r)
    pr = sub.add_parser("predict", help="classify new images with a trained run", epilog=EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    pr.add_argument("--images", required=True, help="folder of new images (class folders optional) or a file list")
    pr.add_argument("--run", "--model", dest="run", required=True, help="a run directory written by training")
    pr.add_argument("--out", required=True, help="predictions file (.parquet, or .csv)")
    pr.add_argument("--features", default=None, help="where to cache the new images' features "
                    "(default: stage 2's per-backbone cache)")
    add_options(pr, PredictOptions, only=("top_k",))
    g = pr.add_argument_group("stage 1 (extraction)")
    add_options(g, ExtractOptions, only=("weights", "onnx"),
                help={"weights": "the backbone state_dict file the run was trained with, if any",
                      "onnx": "the user ONNX model the run was trained on, if any"})
    add_options(g, ExtractOptions, only=STAGE1)
    add_progress_flag(pr)
    c = sub.add_parser("compare", help="same head on several backbones: table + bar chart", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--images", required=True, help="class-folder tree or CSV/Parquet list")
    c.add_argument("--workdir", required=True, help="holds features/, runs/ and compare.csv/.json/.png")
    c.add_argument("--backbones", required=True, help="comma-separated registry names and/or .onnx files")
    _stage1_flags(c, backbone=False)
    _train_flags(c)
    add_options(c, CVOptions, only=("folds",), help={"folds": "cross-validation folds that rank the backbones (0: "
                                                     "no cross-validation, rank by one split's validation score)"})
    add_progress_flag(c)
    return parser


def _stage1_options(args) -> ExtractOptions:
    """The stage-1 options of a parsed command line; the backbone flags travel separately (cache naming)."""
    return options_from_args(ExtractOptions, args, only=STAGE1 + STAGE1_GROUPS)


def _train_options(args) -> TrainOptions:
    return options_from_args(TrainOptions, args, only=TRAIN, flags=TRAIN_FLAGS)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import pipeline

    stage1 = _stage1_options(args)
    try:
        if args.command == "run":
            result = pipeline.run(args.images, args.workdir, backbone=args.backbone, weights=args.weights,
                                  onnx=args.onnx, input_size=args.input_size, run_name=args.run_name,
                                  stage1_options=stage1, train_options=_train_options(args), progress=args.progress)
            print(result.format())
        elif args.command == "predict":
            from stage2_classify.inference.predict import prediction_summary

            frame = pipeline.predict(args.images, args.run, args.out, features=args.features, top_k=args.top_k,
                                     weights=args.weights, onnx=args.onnx, stage1_options=stage1,
                                     progress=args.progress)
            print(prediction_summary(frame, args.out))
        else:
            from pipeline.report import format_table

            names = [b.strip() for b in args.backbones.split(",") if b.strip()]
            rows = pipeline.compare(args.images, names, args.workdir, stage1_options=stage1,
                                    train_options=_train_options(args), folds=args.folds, progress=args.progress)
            print(format_table(rows))
            if rows:
                print(f"every backbone trained and tested on one split: {rows[0]['split_file']}")
            print(f"table: {args.workdir}/compare.csv  chart: {args.workdir}/compare.png")
    except KeyboardInterrupt as exc:
        print(f"interrupted: {str(exc) or 'finished work is kept; rerun to resume'}", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"pipeline: error: {exc}", file=sys.stderr)
        return 1
    return 0
