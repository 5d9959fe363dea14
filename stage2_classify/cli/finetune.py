"""``stage2-classify finetune``: fine-tune a trained run's backbone end to end (LP-FT) into a new run directory."""

from __future__ import annotations

from hybrid_common import add_options, add_progress_flag, options_from_args
from stage2_classify.cli.common import RAW, add_run_flag
from stage2_classify.finetuning.options import FinetuneOptions

DESCRIPTION = """\
Fine-tunes the backbone of a trained run end to end, starting from the run's head (LP-FT: linear probe, then
fine-tune), on the run's own train split, stopping early on its validation split; the test split is never seen,
so frozen and fine-tuned numbers compare image for image. Writes an ordinary run directory (--out) with the
fine-tuned backbone (backbone.safetensors, finetune.json) and comparison.json (frozen vs fine-tuned on the same
test images, paired), and the fine-tuned vectors of every image (--features, default OUT.features).
Checkpoints every epoch in OUT.checkpoints/: after Ctrl-C or a kill, --resume continues."""

EPILOG = """examples:
  stage2-classify finetune --run work/runs/first --out work/runs/tuned --input-size 128      # a 2-core CPU
  stage2-classify finetune --run work/runs/first --out work/runs/tuned --device cuda --epochs 20
  stage2-classify finetune --run work/runs/first --out work/runs/tuned --resume             # after Ctrl-C
  stage1-extract --images new_images --out feats-tuned --backbone-from work/runs/tuned
"""


def add_parser(sub) -> None:
    f = sub.add_parser("finetune", help="fine-tune a run's backbone end to end (LP-FT) into a new run directory",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=RAW)
    add_run_flag(f, help="the trained run to start from (its head, its split)")
    f.add_argument("--images", default=None, help="the folder or file list the run's vectors came from (default: "
                   "the images root stage 1 recorded)")
    f.add_argument("--out", required=True, help="run directory to write")
    f.add_argument("--features", default=None, help="where the fine-tuned vectors of every image go "
                   "(default OUT.features)")
    f.add_argument("--resume", action="store_true", help="continue an interrupted fine-tune from OUT.checkpoints/")
    add_options(f, FinetuneOptions)
    add_progress_flag(f)
    f.set_defaults(handler=run_finetune)


def run_finetune(args) -> None:
    from stage2_classify.finetuning.api import finetune

    try:
        finetune(args.run, args.out, images=args.images, features=args.features, resume=args.resume,
                 progress=args.progress, options=options_from_args(FinetuneOptions, args))
    except KeyboardInterrupt:  # finetune said what was kept and how to continue
        raise SystemExit(130) from None
