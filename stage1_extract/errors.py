"""The one base of every exception stage 1 raises on purpose, so a caller can catch stage 1's errors at once.

Each specific error also keeps the built-in base it always had (``ValueError``, ``RuntimeError``, ``OSError``…),
so code that catches those still works::

    try:
        extract(images, out)
    except Stage1Error as exc:  # a bad input, a missing extra, a locked output, a model that cannot be used…
        print(exc)
"""

from __future__ import annotations


class Stage1Error(Exception):
    """Base of every error stage 1 raises on purpose (``str(exc)`` says what went wrong and how to fix it)."""


class OptionError(Stage1Error, ValueError):
    """An option or argument stage 1 cannot use (an unknown backbone, provider, engine, decoder, group regex…)."""


class InputError(Stage1Error, ValueError):
    """An input that cannot be used as a whole: a file list without a ``path`` column, an unreadable ONNX model,
    a group-salt file that is too short. (A single bad image is not an error: it goes to the errors table.)"""


class InputNotFoundError(Stage1Error, FileNotFoundError):
    """``--images``, ``--onnx`` or a file a run needs does not exist."""


class NonFiniteFeaturesError(Stage1Error, FloatingPointError):
    """The model produced NaN or infinite features: a broken model, not a bad image; nothing of it is written."""
