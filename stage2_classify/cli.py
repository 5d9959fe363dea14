"""``stage2-classify``: train / evaluate / predict / sweep on feature shards (heavy imports stay inside main)."""

from __future__ import annotations

import argparse
import sys


def _hidden(text: str) -> tuple[int, ...]:
    text = text.strip().lower()
    if text in ("", "0", "none", "linear"):
        return ()
    try:
        return tuple(int(p) for p in text.split("x") if p)
    except ValueError:
        raise argparse.ArgumentTypeError(f"hidden sizes look like 512, 512x256 or 0 (linear), not {text!r}") from None


def _list(kind):
    def parse(text: str):
        return [kind(p) for p in text.split(",") if p.strip()]
    return parse


def _common_training(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", required=True, help="directory (or URI) of stage-1 feature shards")
    p.add_argument("--epochs", type=int, default=50, help="maximum epochs (early stopping usually ends sooner)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--patience", type=int, default=5, help="early-stopping patience on validation loss")
    p.add_argument("--seed", type=int, default=0, help="seeds the split and the training")
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--test-fraction", type=float, default=0.15)
    p.add_argument("--class-weight", choices=["auto", "balanced", "none"], default="auto",
                   help="auto: balanced weights when the largest class is >1.5× the smallest")
    p.add_argument("--split-file", default=None, help="CSV/Parquet with columns path,split (train/val/test)")
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stage2-classify",
        description="Train, evaluate and use a Keras dense classifier on cached feature shards.",
        epilog="Examples:\n"
        "  stage2-classify train --shards work/features/efficientnet_lite0 --out work/runs/first\n"
        "  stage2-classify train --shards feats --out runs/linear --hidden 0\n"
        "  stage2-classify predict --shards new_feats --model work/runs/first --out predictions.csv\n"
        "  stage2-classify sweep --shards feats --out sweeps/a --hidden 0,256,512,512x256 --dropout 0.2,0.4",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a head and write a run directory (model, metrics, plots)")
    _common_training(t)
    t.add_argument("--out", required=True, help="run directory to write (replaced atomically if it exists)")
    t.add_argument("--hidden", type=_hidden, default=(256,), help="hidden sizes, e.g. 256 or 512x256; 0 = linear (default 256)")
    t.add_argument("--dropout", type=float, default=0.3)
    t.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")

    e = sub.add_parser("evaluate", help="metrics of a trained run on labelled shards")
    e.add_argument("--shards", required=True)
    e.add_argument("--model", required=True, help="run directory written by train")
    e.add_argument("--out", default=None, help="write the metrics as JSON here")

    p = sub.add_parser("predict", help="predicted class and probabilities for every row of the shards")
    p.add_argument("--shards", required=True)
    p.add_argument("--model", required=True, help="run directory written by train")
    p.add_argument("--out", required=True, help="output file: .parquet, or .csv")

    s = sub.add_parser("sweep", help="train several heads on vectors loaded once; table sorted by validation score")
    _common_training(s)
    s.add_argument("--out", default=None, help="directory for sweep.csv and sweep.json")
    s.add_argument("--hidden", type=_list(_hidden), default=[(), (256,), (512,)],
                   help="comma-separated hidden configs, e.g. 0,256,512,512x256")
    s.add_argument("--dropout", type=_list(float), default=[0.3], help="comma-separated, e.g. 0.2,0.4")
    s.add_argument("--lr", type=_list(float), default=[1e-3], help="comma-separated, e.g. 1e-3,3e-4")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import stage2_classify as s2
    from shardformat import ShardFormatError

    try:
        if args.command in ("train", "sweep"):
            options = dict(epochs=args.epochs, batch_size=args.batch_size, patience=args.patience, seed=args.seed,
                           val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                           class_weight=args.class_weight, split_file=args.split_file)
            if args.command == "train":
                result = s2.train(args.shards, args.out, verbose=0 if args.quiet else 1, hidden=args.hidden,
                                  dropout=args.dropout, learning_rate=args.lr, **options)
                if args.quiet:
                    print(result.summary)
            else:
                s2.sweep(args.shards, args.out, hidden=args.hidden, dropout=args.dropout, learning_rate=args.lr,
                         verbose=1, **options)
        elif args.command == "evaluate":
            s2.evaluate(args.shards, args.model, args.out)
        else:
            out = s2.predict(args.shards, args.model, args.out)
            print(f"predictions written to {out}")
    except KeyboardInterrupt:
        print("interrupted: no partial run directory was left behind", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError, ShardFormatError) as exc:
        print(f"stage2-classify: error: {exc}", file=sys.stderr)
        return 1
    return 0
