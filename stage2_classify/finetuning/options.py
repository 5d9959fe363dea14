"""Every option of ``finetune``, defined once (default, CLI flag, help, choices), as stage 2's other options are.

The defaults are the Keras transfer-learning guide's recipe for small data sets: BatchNorm kept in inference
mode, AdamW with a low backbone learning rate and a higher head rate, cosine decay after a linear
warm-up, label smoothing, early stopping on the validation loss with the best weights restored.
"""

from __future__ import annotations

import argparse
import dataclasses
import re

from hybrid_common import option

DEVICES = ("auto", "cpu", "cuda")


def parse_unfreeze(text: str) -> str:
    """``all``, ``bn`` or ``last:K`` (K ≥ 1)."""
    text = text.strip().lower()
    if text in ("all", "bn") or re.fullmatch(r"last:[1-9]\d*", text):
        return text
    raise argparse.ArgumentTypeError(f"--unfreeze takes all, bn or last:K (e.g. last:2), not {text!r}")


def parse_augment(text: str) -> str:
    """``medical`` (default), ``medical+flip`` (adds horizontal flips) or ``none``."""
    text = text.strip().lower()
    if text in ("medical", "medical+flip", "none"):
        return text
    raise argparse.ArgumentTypeError(f"--augment takes medical, medical+flip or none, not {text!r}")


@dataclasses.dataclass
class FinetuneOptions:
    """The options of :func:`stage2_classify.finetune` (everything but the run, the images and ``out``)."""

    epochs: int = option(15, parse=int, help="most epochs (default 15; early stopping keeps the best)")
    input_size: int | None = option(None, parse=int,
                                    help="square input size while fine-tuning and afterwards (default: the "
                                    "backbone's, 224 for Lite0; 128 makes a 2-core CPU ~3x faster)")
    unfreeze: str = option("all", parse=parse_unfreeze,
                           help="what trains besides the head: all (default), bn (BatchNorm scales and shifts "
                           "only) or last:K (the last K blocks)")
    learning_rate: float = option(5e-4, parse=float, flag="--lr",
                                  help="AdamW peak learning rate of the backbone (default 5e-4; the head gets "
                                  "--head-lr-scale times it)")
    head_lr_scale: float = option(2.0, parse=float, help="head learning rate / backbone learning rate (default 2: "
                                  "the head starts converged, LP-FT)")
    weight_decay: float = option(0.01, parse=float, help="AdamW decoupled weight decay (default 0.01; none on "
                                 "biases and BatchNorm)")
    warmup: float = option(0.1, parse=float, help="share of the steps spent warming up linearly (default 0.1)")
    label_smoothing: float = option(0.1, parse=float, help="default 0.1")
    batch_size: int = option(32, parse=int, help="images per step (default 32)")
    patience: int = option(4, parse=int, help="epochs without a better validation loss before stopping (default 4)")
    augment: str = option("medical", parse=parse_augment,
                          help="medical (default): small shifts, scale, rotation, brightness and contrast; "
                          "medical+flip: also horizontal flips (only when left/right carries no meaning); none")
    device: str = option("auto", choices=DEVICES,
                         help="auto (CUDA when usable, with bfloat16 mixed precision), cpu or cuda")
    head_init: str = option("probe", choices=("probe", "random"),
                            help="probe (default, LP-FT): start from the run's trained head (fitted again on frozen "
                            "vectors when --input-size changes them); random: plain fine-tuning from a new head")
    seed: int = option(0, parse=int, help="seeds batches and augmentation (default 0)")
