"""``predict()``: the one-call form of ``Classifier.load(run).predict(inputs)``, and its one-line summary.

It lives beside :class:`~stage2_classify.Classifier` (which it calls) rather than with ``evaluate``, so the
two never import each other.
"""

from __future__ import annotations

import os

from hybrid_common import renamed_keywords
from stage2_classify.inference.classifier import Classifier
from stage2_classify.options import PredictOptions


@renamed_keywords(model="run", model_dir="run", run_dir="run", features_dir="features")
def predict(inputs, run: str | os.PathLike, out: str | os.PathLike | None = None, *,
            top_k: int = PredictOptions.top_k, progress: bool = True, **options):
    """Predict with the trained ``run`` on images or vectors; returns a pandas DataFrame, also written to
    ``out`` when given (CSV when the name ends in ``.csv``, Parquet otherwise).

    ``inputs``: one image file, a folder, a file list, a list of paths, a feature folder or an (n, D) array
    (see :meth:`stage2_classify.Classifier.predict`, which takes the same ``options``, e.g. ``features=``:
    where images' vectors are cached). Shards made by another backbone, other weights or other preprocessing
    than the model's are refused (:class:`shardformat.IncompatibleShardsError`).
    """
    return Classifier.load(run).predict(inputs, top_k=top_k, out=out, progress=progress, **options)


def prediction_summary(frame, out) -> str:
    """The line the CLIs print after predicting: how many predictions, how many flagged unknown or unusable."""
    done = frame["predicted"].notna()
    text = f"{int(done.sum())} predictions written to {out}"
    if frame["unknown"].notna().any():
        text += f"; {int(frame['unknown'].fillna(False).sum())} flagged unknown (unlike the training data)"
    else:
        text += "; the 'unknown' flag is unavailable for this run (see the note above)"
    if (~done).any():
        text += f"; {int((~done).sum())} inputs could not be used (see the 'error' column)"
    return text
