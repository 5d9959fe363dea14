"""``pipeline``: run / predict / compare from the command line (heavy imports stay inside the commands)."""

from __future__ import annotations

import argparse
import sys

from stage2_classify.options import parse_hidden  # one --hidden parser for both CLIs


def _stage1_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("stage 1 (extraction)")
    g.add_argument("--provider", choices=["auto", "cuda", "cpu", "tensorrt"], default="auto",
                   help="ONNX Runtime execution provider (default auto: CUDA when a GPU answers, else CPU)")
    g.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                   help="precision of the exported backbone (fp16 pays off on GPUs only; default fp32)")
    g.add_argument("--batch-size", type=int, default=None, help="inference batch size")
    g.add_argument("--workers", type=int, default=None, help="decode worker processes")
    g.add_argument("--draft", action="store_true", help="fast JPEG draft decoding for large images")
    g.add_argument("--engine", choices=["local", "ray"], default="local", help="run stage 1 locally or on Ray")
    g.add_argument("--ray-address", default=None, help="Ray cluster address (with --engine ray)")


def _train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("stage 2 (classifier)")
    g.add_argument("--hidden", type=parse_hidden, default=None, help="hidden layer sizes, e.g. 512 or 512x256; 0 = linear")
    g.add_argument("--dropout", type=float, default=None, help="dropout after each hidden layer (default 0.3)")
    g.add_argument("--lr", type=float, default=None, help="learning rate")
    g.add_argument("--epochs", type=int, default=None, help="most epochs; early stopping usually ends sooner")
    g.add_argument("--train-batch-size", type=int, default=None, help="training batch size of the classifier")
    g.add_argument("--seed", type=int, default=None, help="seed of the split and the initial weights")
    g.add_argument("--class-weight", choices=["auto", "balanced", "none"], default=None,
                   help="weigh rare classes up in the loss (default auto: balanced when classes are imbalanced)")


def _collect(args, names: dict[str, str]) -> dict:
    return {target: getattr(args, src) for src, target in names.items() if getattr(args, src) is not None}


STAGE1 = {"provider": "provider", "precision": "precision", "batch_size": "batch_size", "workers": "workers",
          "draft": "draft"}
TRAIN = {"hidden": "hidden", "dropout": "dropout", "lr": "learning_rate", "epochs": "epochs",
         "train_batch_size": "batch_size", "seed": "seed", "class_weight": "class_weight"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline",
        description="Run the two stages in order: extract features (cached per backbone), then train a classifier.",
        epilog="Examples:\n"
        "  pipeline run --images data/animal_mnist --workdir work/demo\n"
        "  pipeline run --images data/animal_mnist --workdir work/demo --hidden 256 --dropout 0.2  # retrain only\n"
        "  pipeline predict --images new/ --model work/demo/runs/efficientnet_lite0/latest --out preds.csv\n"
        "  pipeline compare --images data/animal_mnist --workdir work/cmp --backbones efficientnet_lite0,efficientnet_lite1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="extract (incremental) then train")
    r.add_argument("--images", required=True, help="class-folder tree or CSV/Parquet list")
    r.add_argument("--workdir", required=True, help="holds features/<backbone>/ and runs/<backbone>/<name>/")
    r.add_argument("--backbone", default=None, help="registry name (default efficientnet_lite0)")
    r.add_argument("--weights", default=None, help="state_dict file for the backbone")
    r.add_argument("--onnx", default=None, help="your own ONNX model instead of --backbone")
    r.add_argument("--input-size", type=int, default=None, help="with --onnx, if the model's size is dynamic")
    r.add_argument("--run-name", default=None, help="name of the training run folder (default: latest)")
    _stage1_args(r)
    _train_args(r)
    pr = sub.add_parser("predict", help="classify new images with a trained run")
    pr.add_argument("--images", required=True, help="folder of new images (class folders optional) or a file list")
    pr.add_argument("--model", required=True, help="a run directory written by training")
    pr.add_argument("--out", required=True, help="predictions file (.parquet, or .csv)")
    pr.add_argument("--top-k", type=int, default=3, help="labels and probabilities of the k likeliest classes")
    pr.add_argument("--features", default=None, help="where to cache the new images' features "
                    "(default: stage 2's per-backbone cache)")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar or notes")
    pr.add_argument("--weights", default=None, help="the backbone state_dict file the run was trained with, if any")
    pr.add_argument("--onnx", default=None, help="the user ONNX model the run was trained on, if any")
    _stage1_args(pr)
    c = sub.add_parser("compare", help="same head on several backbones: table + bar chart")
    c.add_argument("--images", required=True, help="class-folder tree or CSV/Parquet list")
    c.add_argument("--workdir", required=True, help="holds features/, runs/ and compare.csv/.json/.png")
    c.add_argument("--backbones", required=True, help="comma-separated registry names and/or .onnx files")
    _stage1_args(c)
    _train_args(c)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import pipeline

    common = dict(engine=args.engine, ray_address=args.ray_address, stage1_options=_collect(args, STAGE1))
    try:
        if args.command == "run":
            result = pipeline.run(args.images, args.workdir, backbone=args.backbone, weights=args.weights,
                                  onnx=args.onnx, input_size=args.input_size, run_name=args.run_name,
                                  train_options=_collect(args, TRAIN), **common)
            print(result.format())
        elif args.command == "predict":
            from stage2_classify.inference.predict import prediction_summary as _prediction_summary

            frame = pipeline.predict(args.images, args.model, args.out, features=args.features, top_k=args.top_k,
                                     weights=args.weights, onnx=args.onnx, progress=not args.no_progress, **common)
            print(_prediction_summary(frame, args.out))
        else:
            from pipeline.report import format_table

            names = [b.strip() for b in args.backbones.split(",") if b.strip()]
            rows = pipeline.compare(args.images, names, args.workdir, train_options=_collect(args, TRAIN), **common)
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
