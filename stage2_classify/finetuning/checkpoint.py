"""Checkpoints that survive Ctrl-C and ``kill -9``: every epoch's state on disk, the best epoch kept apart.

``OUT.checkpoints/`` holds ``last.safetensors`` (backbone state_dict, head weights, both optimizers' moments
and step counters), ``best.safetensors`` (backbone and head of the best validation loss so far) and
``state.json`` (epochs done, early-stopping state, history, the options), each written atomically, the state
last, so a kill between two files leaves the previous epoch complete. Early stopping lives here rather than in
``keras.callbacks.EarlyStopping`` because its best weights and patience must outlive the process: ``--resume``
continues from the last epoch with the same best-so-far, the same learning-rate schedule and the same batches.
Tensors only (safetensors): nothing is unpickled on resume.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from shardformat import atomic_write_bytes, atomic_write_via_path
from stage2_classify.backend import check_backend
from stage2_classify.errors import Stage2Error

check_backend()
import keras  # noqa: E402

LAST, BEST, STATE = "last.safetensors", "best.safetensors", "state.json"


@dataclasses.dataclass
class TrainingState:
    """What ``state.json`` records: epochs done, the early-stopping state and the per-epoch history."""

    options: dict
    epochs_done: int = 0
    best: float = math.inf
    best_epoch: int = 0
    wait: int = 0
    history: dict = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    @classmethod
    def read(cls, directory: Path) -> "TrainingState | None":
        path = directory / STATE
        if not path.is_file():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise Stage2Error(f"{path}: unreadable checkpoint state ({exc}); delete {directory} to start over") from None


def _arrays(layer, head, optimizer=None) -> dict[str, np.ndarray]:
    arrays = {f"backbone.{k}": v.detach().cpu().numpy() for k, v in layer.module.state_dict().items()}
    arrays.update({f"head.{i}": np.asarray(w) for i, w in enumerate(head.get_weights())})
    if optimizer is not None:
        arrays.update({f"opt.{i}": np.asarray(v.numpy()) for i, v in enumerate(optimizer.state())})
    return {k: np.ascontiguousarray(v) for k, v in arrays.items()}


def save(path: Path, layer, head, optimizer=None) -> None:
    from safetensors.numpy import save_file

    arrays = _arrays(layer, head, optimizer)
    atomic_write_via_path(path, lambda tmp: save_file(arrays, tmp))


def restore(path: Path, layer, head, optimizer=None) -> None:
    """Load a checkpoint into the backbone, the head and (when given, built) the optimizers."""
    import torch
    from safetensors.numpy import load_file

    try:
        arrays = load_file(str(path))
    except Exception as exc:
        raise Stage2Error(f"{path}: damaged checkpoint ({exc}); delete {path.parent} to start over") from None
    state = {k[len("backbone."):]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("backbone.")}
    layer.module.load_state_dict(state)
    head.set_weights([arrays[f"head.{i}"].reshape(tuple(w.shape)) for i, w in enumerate(head.weights)])
    if optimizer is not None:
        variables = optimizer.state()
        if sum(k.startswith("opt.") for k in arrays) != len(variables):
            raise Stage2Error(f"{path}: the optimizer state does not fit this model; delete {path.parent} to start over")
        for i, var in enumerate(variables):
            var.assign(arrays[f"opt.{i}"].reshape(tuple(var.shape)))


class EpochCheckpoint(keras.callbacks.Callback):
    """After every epoch: history, early stopping on ``monitor`` (lower is better), best and last checkpoints."""

    def __init__(self, directory: Path, layer, head, state: TrainingState, *, monitor: str, patience: int,
                 clock=None):
        super().__init__()
        self.directory, self.layer, self.head, self.state = directory, layer, head, state
        self.monitor, self.patience, self.clock = monitor, patience, clock

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        """Dropout and augmentation draw from a generator seeded per epoch: a resumed run repeats the very
        epochs an uninterrupted one would have run."""
        seed = int(self.state.options.get("seed", 0)) * 1000 + epoch
        keras.utils.set_random_seed(seed)
        for i, layer in enumerate(self.model.layers):  # augmentation layers keep their own generator state
            for gen in (v for v in vars(layer).values() if isinstance(v, keras.random.SeedGenerator)):
                gen.state.assign(np.asarray([seed, i], dtype=gen.state.dtype))

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        logs = logs or {}
        for key, value in logs.items():
            self.state.history.setdefault(key, []).append(float(value))
        value = float(logs.get(self.monitor, math.inf))
        s = self.state
        s.epochs_done = epoch + 1
        if self.clock is not None:
            s.seconds = self.clock()
        if value < s.best - 1e-7:
            s.best, s.best_epoch, s.wait = value, epoch + 1, 0
            save(self.directory / BEST, self.layer, self.head)
        else:
            s.wait += 1
        save(self.directory / LAST, self.layer, self.head, self.model.optimizer)
        atomic_write_bytes(self.directory / STATE, json.dumps(dataclasses.asdict(s)).encode())
        if s.wait >= self.patience:
            self.model.stop_training = True
