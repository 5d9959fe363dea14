"""Fine-tuned vectors remember which images trained their backbone: evaluating on those images is flagged.

A fine-tuned backbone has seen its run's train and validation images; a head trained later on its vectors
with another split (another seed, other fractions) would test on some of them and look better than it is.
The shards' provenance names the fine-tuned run directory, whose ``split.csv`` says which images those were.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def seen_by_backbone(metadata) -> dict[str, set[str]] | None:
    """Content ids of the images the fine-tuned backbone trained on (``train``) and stopped early on
    (``validation``); None for pretrained vectors (or when the fine-tuned run directory is no longer there)."""
    prov = getattr(metadata, "provenance", None) or {}
    if prov.get("kind") != "finetuned" or not prov.get("directory"):
        return None
    split_csv = Path(prov["directory"]) / "split.csv"
    try:
        import pandas as pd

        frame = pd.read_csv(split_csv, usecols=["content_id", "split"], dtype=str)
    except (OSError, ValueError):
        return None
    return {name: set(frame.loc[frame["split"] == name, "content_id"].dropna()) for name in ("train", "validation")}


def overlap_notes(metadata, content_ids, split: dict[str, np.ndarray]) -> list[str]:
    """A warning per evaluated split holding images the fine-tuned backbone learnt from: validation images it
    trained on, test images it trained or stopped early on."""
    seen = seen_by_backbone(metadata)
    if not seen:
        return []
    ids = np.asarray(content_ids, dtype=object)
    out = []
    for name, used in (("validation", seen["train"]), ("test", seen["train"] | seen["validation"])):
        rows = split.get(name, np.zeros(0, np.int64))
        hit = int(sum(cid in used for cid in ids[rows]))
        if hit:
            out.append(f"WARNING: {hit} of {len(rows)} {name} images trained the fine-tuned backbone these vectors "
                       f"come from ({metadata.provenance['directory']}): its {name} metrics are optimistic; reuse "
                       f"its split (--split-file {Path(metadata.provenance['directory']) / 'split.csv'})")
    return out
