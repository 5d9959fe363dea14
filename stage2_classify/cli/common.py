"""What every ``stage2-classify`` command shares: the examples, and the glossary's flags for a feature folder
(``--features``, old spelling ``--shards``) and a run directory (``--run``, old spelling ``--model``)."""

from __future__ import annotations

import argparse

EPILOG = """examples:
  stage2-classify train    --features work/features/efficientnet_lite0 --out work/runs/first
  stage2-classify train    --features feats --out runs/linear --hidden 0
  stage2-classify train    --features feats --out runs/deep --hidden 512x256 --dropout 0.4 --lr 3e-4
  stage2-classify evaluate --features other_feats --run work/runs/first --out metrics.json
  stage2-classify predict  --features new_feats --run work/runs/first --out predictions.csv
  stage2-classify predict  --images photo.jpg --run work/runs/first --out predictions.csv --top-k 5
  stage2-classify export   --run work/runs/first --out model.onnx --images data/animal_mnist
  stage2-classify explain  --run work/runs/first --images new_photos/ --out explained/
  stage2-classify sweep    --features feats --out sweeps/a --hidden 0,256,512,512x256 --dropout 0.2,0.4
  stage2-classify cv       --features feats --out cv/a --folds 5
  stage2-classify train    --features other_backbone_feats --out runs/b --split-file work/runs/first/split.csv
  stage2-classify doctor   --features feats --out doctor --run work/runs/first
(--shards and --model are the old spellings of --features and --run; they still work)
"""

RAW = argparse.RawDescriptionHelpFormatter


def add_features_flag(p, help: str = "feature folder (or URI) of labelled stage-1 shards",
                      required: bool = True) -> None:
    """``--features`` (old spelling ``--shards``): the feature folder a command reads."""
    p.add_argument("--features", "--shards", dest="features", required=required, help=help)


def add_run_flag(p, help: str = "run directory written by train", required: bool = True) -> None:
    """``--run`` (old spelling ``--model``): the run directory a command uses."""
    p.add_argument("--run", "--model", dest="run", required=required, help=help)
