"""Runs at interpreter start (via ``hybrid_transfer_keras.pth``): point Keras at torch where its default cannot work.

Keras chooses its backend when first imported: ``KERAS_BACKEND``, else ``keras.json`` in ``KERAS_HOME``
(default ``~/.keras``), else TensorFlow. This project installs torch, not TensorFlow, so a notebook whose first
cell is ``import keras`` would crash with ``ModuleNotFoundError: tensorflow`` before ``stage2_classify`` could
set anything. Only when no backend is chosen (or TensorFlow is chosen) and TensorFlow is not installed does
this set ``KERAS_BACKEND=torch``; any explicit choice is left alone, and ``HYBRID_TRANSFER_KERAS_HOOK=0`` turns
the hook off. It imports nothing heavy.
"""

import os


def _keras_json_backend() -> str | None:
    import json

    path = os.path.join(os.path.expanduser(os.environ.get("KERAS_HOME") or "~/.keras"), "keras.json")
    try:
        with open(path) as fh:
            value = json.load(fh).get("backend")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def apply() -> None:
    if os.environ.get("HYBRID_TRANSFER_KERAS_HOOK") == "0":  # opted out: Keras' own choice, unchanged
        return
    if "KERAS_BACKEND" in os.environ or _keras_json_backend() not in (None, "tensorflow"):
        return
    import importlib.util

    if importlib.util.find_spec("tensorflow") is None:
        os.environ["KERAS_BACKEND"] = "torch"


apply()
