"""Reading a run directory back: is it complete, do its labels still match the model, and the loaded model.

The model is loaded with Keras' safe mode (no code, nothing unpickled); a directory that is not a finished
run is refused with a :class:`~stage2_classify.RunDirError` saying what is wrong and what to do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from pathlib import Path

from hybrid_common import renamed_keywords
from shardformat import ShardMetadata
from stage2_classify.backend import check_backend
from stage2_classify.errors import DatasetError, RunDirError
from stage2_classify.runs.layout import LABELS_HASH_KEY, MARKER, REQUIRED, labels_hash


@renamed_keywords(run_dir="run", model="run", model_dir="run")
def check_run(run: str | os.PathLike) -> Path:
    """The path of a complete run directory, or :class:`RunDirError` saying what is wrong and what to do."""
    path = Path(run).expanduser()
    if not path.is_dir():
        raise RunDirError(f"{path}: no such run directory (train one with: stage2-classify train --out {path})")
    if not (path / MARKER).is_file():
        raise RunDirError(f"{path}: not a complete training run (no {MARKER} completion marker: the training was "
                          f"interrupted or this is not a stage-2 run); train it again with --out {path}")
    missing = [f for f in REQUIRED if not (path / f).is_file()]
    if missing:
        raise RunDirError(f"{path}: not a complete training run (missing {', '.join(missing)}); train it again")
    if not zipfile.is_zipfile(path / "model.keras"):  # Keras would say "File not found" about a file that exists
        raise RunDirError(f"{path / 'model.keras'}: not a Keras model file (a .keras file is a zip archive; this "
                          "one is not, e.g. a pickle saved under that name); train the run again")
    return path


def check_labels(path: Path, classes: list) -> None:
    """Refuse a run whose ``labels.json`` is not the class list the model was trained with.

    Training records a hash of the class list (in output order) in ``run.json``; a labels.json reordered or
    edited since would silently rename every prediction. Runs made before the hash existed are not checked.
    """
    try:
        expected = json.loads((path / MARKER).read_text()).get(LABELS_HASH_KEY)
    except (OSError, ValueError, AttributeError):
        expected = None
    if expected is not None and labels_hash(classes) != expected:
        raise RunDirError(f"{path}: labels.json no longer matches the model (its classes were reordered or "
                          "edited after training); restore the original labels.json or train again")


@dataclasses.dataclass
class LoadedRun:
    path: Path
    model: object
    classes: list[str]
    metadata: ShardMetadata  # the stage-1 metadata of the shards the model was trained on
    #: a fine-tuned run's own backbone (the run directory, holding finetune.json), else None: passed as
    #: ``weights`` to ``stage1_extract.find_model`` / ``extract(backbone_from=…)``, so a moved run still works
    weights: Path | None = None


@renamed_keywords(run_dir="run", model="run", model_dir="run")
def load_run(run: str | os.PathLike) -> LoadedRun:
    """Load a complete run directory. The model is loaded with Keras' safe mode: no code, nothing unpickled."""
    path = check_run(run)
    check_backend()
    import keras

    model = keras.saving.load_model(path / "model.keras", compile=False, safe_mode=True)
    classes = json.loads((path / "labels.json").read_text())
    meta = ShardMetadata.from_json((path / "shard_metadata.json").read_text())
    n_out = int(model.outputs[0].shape[-1])
    if not isinstance(classes, list) or len(classes) != n_out:
        raise DatasetError(f"{path}: labels.json lists {len(classes)} classes but the model has {n_out} outputs")
    check_labels(path, classes)
    return LoadedRun(path, model, [str(c) for c in classes], meta, own_backbone(path))


def own_backbone(path: Path) -> Path | None:
    """``path`` when it is a fine-tuned run (its ``finetune.json`` describes its own backbone), else None."""
    return path if (path / "finetune.json").is_file() else None
