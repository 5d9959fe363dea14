"""The one check that Keras runs on its torch backend, used by everything that imports keras.

It lives in a module of its own (not in the package ``__init__``) so that training, loading and the
``Classifier`` can call it without importing the package they are part of.
"""

from __future__ import annotations

import os
import sys

from stage2_classify.errors import BackendError

_BACKEND_HELP = ("stage2_classify needs Keras' 'torch' backend. Set KERAS_BACKEND=torch (or leave it unset) "
                 "before keras is imported, or import stage2_classify before keras.")


def check_backend() -> None:
    """Raise :class:`BackendError` unless Keras runs (or will run) on torch; imports keras if needed."""
    if "keras" not in sys.modules and any(name.startswith("keras.src.") for name in sys.modules):
        # An earlier ``import keras`` failed half-way (typically: no KERAS_BACKEND, so Keras tried TensorFlow);
        # its backend choice is cached in the modules it left behind, so every later import fails the same way.
        raise BackendError("an earlier `import keras` failed (Keras tried another backend, usually TensorFlow, "
                           "which is not installed). Restart the Python process (the notebook kernel), then set "
                           "KERAS_BACKEND=torch before importing keras (os.environ['KERAS_BACKEND'] = 'torch'), "
                           "or import stage2_classify first.")
    if "keras" not in sys.modules:
        wanted = os.environ.get("KERAS_BACKEND", "torch")
        if wanted != "torch":
            raise BackendError(f"KERAS_BACKEND is {wanted!r}. {_BACKEND_HELP}")
    import keras

    if keras.backend.backend() != "torch":
        raise BackendError(f"Keras was already imported with the {keras.backend.backend()!r} backend. {_BACKEND_HELP}")


def keras_already_imported() -> bool:
    """True when keras was imported (or an import was tried) before stage 2."""
    return any(name == "keras" or name.startswith("keras.src.") for name in sys.modules)
