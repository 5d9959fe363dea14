"""``stage2-classify``: train / evaluate / predict / export / explain / sweep / cv / doctor on feature shards.

One module per command group (``training``: train, sweep, cv; ``using``: evaluate, predict, export;
``explain``; ``doctor``; ``finetune``), their flags built from the option dataclasses of
:mod:`stage2_classify.options`. Keras and torch are imported only once a command runs, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import sys

from stage2_classify.cli import doctor, explain, finetune, training, using
from stage2_classify.cli.common import EPILOG, RAW
from stage2_classify.options import parse_hidden  # noqa: F401  (its old home; the pipeline CLI used it from here)

__all__ = ["build_parser", "main", "parse_hidden"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stage2-classify",
        description="Train, evaluate and use a Keras dense classifier (torch backend) on cached feature shards.",
        epilog=EPILOG, formatter_class=RAW,
    )
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{train,evaluate,predict,export,explain,sweep,cv,doctor,finetune}")
    training.add_parsers(sub)
    using.add_parsers(sub)
    explain.add_parser(sub)
    doctor.add_parser(sub)
    finetune.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "check", None):
        args.check(parser, args)
    from shardformat import ShardFormatError
    from stage1_extract.errors import Stage1Error
    from stage2_classify.errors import Stage2Error

    try:
        args.handler(args)
    except KeyboardInterrupt:
        print("interrupted: nothing half-written was left behind", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError, ShardFormatError, Stage2Error, Stage1Error) as exc:
        print(f"stage2-classify: error: {exc}", file=sys.stderr)
        return 1
    return 0
