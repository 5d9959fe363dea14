"""What a run directory holds: the file names, the completion marker, and the identity of its class list.

Shared by the writer (which must know which files a run may replace), the files written into it and the loader.
"""

from __future__ import annotations

import hashlib
import json

MARKER = "run.json"
REQUIRED = ("model.keras", "labels.json", "shard_metadata.json", "config.json", "metrics.json", MARKER)
FILES = REQUIRED  # older name
KNOWN = set(REQUIRED) | {"history.json", "split.json", "split.csv", "predictions.parquet", "curves.png",
                         "confusion_matrix.png", "reliability.png"}
KNOWN |= {"ood.npz"}  # the open-set detector (stage2_classify/inference/ood.py)

KNOWN |= {"backbone.safetensors", "finetune.json", "comparison.json"}  # a fine-tuned run (stage2_classify/finetuning/)
KNOWN |= {"report.html"}  # stage2_classify.reports.run_report writes it into the run directory
LABELS_HASH_KEY = "labels_sha256"


def labels_hash(classes: list[str]) -> str:
    """Identity of the class list *in output order*: a reordered or edited labels.json no longer matches."""
    return hashlib.sha256(json.dumps([str(c) for c in classes]).encode()).hexdigest()
