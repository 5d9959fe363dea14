"""Stage 2's options, each defined once: default, CLI flag, help text, parser and choices on a dataclass field.

``TrainOptions`` decides a trained head (it is written to ``config.json``); ``SweepGrid``, ``CVOptions``,
``DoctorOptions`` and ``PredictOptions`` hold the options of the other commands that appear in more than one
place. The stage-2 CLI and the pipeline CLI build their flags from these classes
(``hybrid_common.add_options``), and ``train()``, ``sweep()``, ``cross_validate()``, ``doctor()`` and
``predict()`` take their keyword defaults from the class attributes (``epochs: int = TrainOptions.epochs``),
so a default or a choice list cannot drift between them. Nothing heavy is imported here: ``--help`` reads it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Callable, Sequence

from hybrid_common import option

CLASS_WEIGHTS = ("auto", "balanced", "none")
MATMUL_PRECISIONS = ("highest", "high", "medium")
RANK_KEYS = ("macro_f1", "balanced_accuracy", "accuracy", "log_loss")
#: older spellings of the sweep's ranking keys (they ranked on one validation split; now on cross-validation)
OLD_RANK_KEYS = {"val_macro_f1": "macro_f1", "val_balanced_accuracy": "balanced_accuracy", "val_accuracy": "accuracy",
                 "val_loss": "log_loss"}
HEADS = ("auto", "linear", "mlp")
#: cv's heads: the training heads, plus the fast fixed-L2 linear fit (``fast-linear``) and ``train``, the older
#: spelling of "the head train makes" (now ``auto``)
CV_HEADS = (*HEADS, "fast-linear", "train")
#: the linear head's L2 strengths (penalty on the mean log-loss), strongest first, tried on the validation split
L2_GRID = tuple(float(v) for v in (10.0, 3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5))
NEIGHBOUR_BACKENDS = ("auto", "exact", "usearch")
IMBALANCE_RATIO = 1.5  # class_weight="auto" balances when the largest class is more than this × the smallest


def parse_hidden(text: str) -> tuple[int, ...]:
    """'512' → (512,), '512x256' → (512, 256), '0' / 'linear' → () (a linear head). The one ``--hidden``
    parser: the stage-2 CLI and the pipeline CLI both use it."""
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


def parse_group_regex(text: str) -> str:
    """``--group-regex``: refused at parse time unless it is a regex with exactly one capture group."""
    import re

    try:
        groups = re.compile(text).groups
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid regular expression: {exc}") from None
    if groups != 1:
        raise argparse.ArgumentTypeError(f"{text!r} needs exactly one capture group (found {groups})")
    return text


def parse_fraction(text: str) -> float:
    """A share in [0, 1), for ``--val-fraction`` and ``--test-fraction``."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"a fraction in [0, 1), not {text}")
    return value


def comma_list(kind: Callable[[str], object]) -> Callable[[str], list]:
    """A parser for comma-separated values of ``kind`` (``--hidden 0,256,512x256`` in a sweep)."""
    def parse(text: str):
        values = [kind(p) for p in text.split(",") if p.strip()]
        if not values:
            raise argparse.ArgumentTypeError("give at least one value")
        return values
    parse.__name__ = f"comma-separated {getattr(kind, '__name__', 'value')}"
    return parse


@dataclasses.dataclass
class TrainOptions:
    """Everything that decides a trained head (written to ``config.json``)."""

    head: str = option("auto", choices=HEADS,
                       help="auto (default): fit the linear head (L2 strength chosen on the validation split) and "
                       "the MLP (--hidden), keep the MLP only when its validation macro-F1 is higher; linear: the "
                       "tuned linear head alone; mlp: the MLP alone")
    hidden: Sequence[int] = option((256,), parse=parse_hidden,  # () = linear head
                                   help="the MLP's hidden layer sizes: 256 (default), 512x256 for two layers, 0 for "
                                   "none (a linear head)")
    dropout: float = option(0.3, help="after each hidden layer")
    learning_rate: float = option(1e-3, flag="--lr", aliases=("--learning-rate",), help="Adam learning rate")
    epochs: int = option(50, help="maximum epochs; early stopping usually ends sooner")
    batch_size: int = option(0, help="MLP rows per training step; 0 (default): scaled to the data, about 1/16 of "
                             "the training rows within 16..256, so small sets get enough steps")
    weight_decay: float = option(1e-4, help="MLP: AdamW weight decay (0: plain Adam)")
    patience: int = option(5, help="epochs without a better validation loss before stopping; the best weights "
                           "are restored")  # early stopping on validation loss
    seed: int = option(0, help="seeds the split and the training: same seed, same numbers")
    val_fraction: float = option(0.15, parse=parse_fraction, help="share of images (or groups) for validation")
    test_fraction: float = option(0.15, parse=parse_fraction, help="share of images (or groups) for test")
    class_weight: str = option("auto", choices=CLASS_WEIGHTS,
                               help=f"auto (default): balanced weights when the largest class is more than "
                               f"{IMBALANCE_RATIO}x the smallest")
    split_file: str | None = option(None, help="freeze the split: a run's split.csv (matched by content_id, then "
                                    "path), or CSV/Parquet with columns path,split (train/val/test); instead of "
                                    "the content-keyed split")
    group_regex: str | None = option(None, parse=parse_group_regex,
                                     help="regroup the shards' rows without re-running the backbone: a regex with "
                                     r"one capture group searched in each path (e.g. '(patient\d+)'); the split "
                                     "and cross-validation never divide a group")
    groups: str | None = option(None, help="regroup from a CSV/Parquet file with columns path,group (paths as the "
                                "shards hold them); wins over --group-regex where it names a row")
    # torch float32 matmuls: "high"/"medium" allow TF32 (GPU) or bf16 (CPU)
    matmul_precision: str = option("highest", choices=MATMUL_PRECISIONS,
                                   help="highest (default): float32. medium: bfloat16 matmuls on CPUs with "
                                   "AVX512-BF16/AMX (~2.5x faster there), TF32 on NVIDIA GPUs")

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        if any(h <= 0 for h in self.hidden):
            raise ValueError(f"hidden sizes must be positive, got {self.hidden} (use () or 0 for a linear head)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning rate must be positive, got {self.learning_rate}")
        if self.class_weight not in CLASS_WEIGHTS:
            raise ValueError(f"class_weight must be auto, balanced or none, not {self.class_weight!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, not {self.head!r}")
        if self.epochs < 1 or self.batch_size < 0 or self.patience < 0:
            raise ValueError("epochs must be at least 1, batch_size at least 0 (0: scaled to the data), patience "
                             "at least 0")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be at least 0, got {self.weight_decay}")
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1):
            raise ValueError(f"val_fraction ({self.val_fraction}) and test_fraction ({self.test_fraction}) must be "
                             "in [0, 1) and sum to less than 1")
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(f"matmul_precision must be highest, high or medium, not {self.matmul_precision!r}")
        if self.split_file is not None:
            self.split_file = os.fspath(self.split_file)
        if self.groups is not None:
            self.groups = os.fspath(self.groups)


@dataclasses.dataclass
class SweepGrid:
    """What a sweep varies (every combination is trained) and how it ranks the heads."""

    hidden: Sequence[Sequence[int]] = option(((), (256,), (512,)), parse=comma_list(parse_hidden),
                                             help="comma-separated hidden configs (default 0,256,512; 0 = linear, "
                                             "512x256 = two layers)")
    dropout: Sequence[float] = option((0.3,), parse=comma_list(float),
                                      help="comma-separated, e.g. 0.2,0.4 (default 0.3)")
    learning_rate: Sequence[float] = option((1e-3,), flag="--lr", aliases=("--learning-rate",),
                                            parse=comma_list(float),
                                            help="comma-separated, e.g. 1e-3,3e-4 (default 1e-3)")
    rank_by: str = option("macro_f1", aliases=("--sort-by",), choices=(*RANK_KEYS, *OLD_RANK_KEYS),
                          help="cross-validated score that ranks the heads and picks the kept one (default macro_f1: "
                          "accuracy flatters heads that ignore small classes); val_* are older spellings")


@dataclasses.dataclass
class CVOptions:
    """K-fold cross-validation: how many folds and which head (the head's own options are TrainOptions')."""

    folds: int = option(5, help="number of folds")
    head: str = option("auto", choices=CV_HEADS,
                       help="auto (default), linear or mlp: the head 'train' makes, chosen again inside every "
                       "fold (its validation split is a content-keyed 0.15 of the fold's training rows); "
                       "fast-linear: one logistic regression with --l2, seconds on 50k vectors; train: older "
                       "spelling of auto")
    l2: float = option(1e-3, help="--head fast-linear: L2 penalty on the mean log-loss")
    max_iter: int = option(100, help="--head fast-linear: most L-BFGS steps per fold")


@dataclasses.dataclass
class DoctorOptions:
    """The data doctor's thresholds and search."""

    # Cosine similarity above which two different files count as near-duplicates. Measured on EfficientNet-Lite0
    # vectors of Animal-MNIST (tests/dirty_set.py): brightened or 1-pixel-shifted copies score 0.98-0.99, JPEG
    # round trips 0.94-0.98; distinct images stay below 0.966, and those above 0.95 are silhouettes a person also
    # calls near-identical. Photos, with more detail than 28x28 silhouettes, separate more easily.
    near_threshold: float = option(0.95, help="cosine similarity for near-duplicates")
    # per row: the nearest-neighbour graph both near-duplicates and outliers are read from
    neighbours: int = option(10, help="nearest neighbours per image")
    outlier_z: float = option(3.5, help="robust z-score an outlier must reach")  # median / MAD, both distances
    folds: int = option(5, help="cross-validation folds when --oof is not given")
    backend: str = option("auto", choices=NEIGHBOUR_BACKENDS,
                          help="neighbour search: exact blocked products, or usearch's approximate index (default "
                          "auto: exact up to 300,000 rows)")


@dataclasses.dataclass
class PredictOptions:
    """What a prediction table holds beyond the predicted class."""

    top_k: int = option(3, help="labels and probabilities of the k likeliest classes")
    all_probabilities: bool = option(False, action="store_true", help="also one prob_<class> column per class")
