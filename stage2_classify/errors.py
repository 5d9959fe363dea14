"""Stage 2's exceptions in one place: every error stage 2 raises on purpose derives from :class:`Stage2Error`.

Each keeps the built-in base it always had (``DatasetError`` is still a ``ValueError``, ``RunDirError`` a
``FileNotFoundError``…), so ``except ValueError`` in existing scripts catches what it caught before, and
``except Stage2Error`` catches all of stage 2's own refusals. They live in one leaf module so that any module
can raise them without importing the module that happens to use them most.

The public ones report their module as ``stage2_classify`` (where users import them from), so tracebacks read
``stage2_classify.BackendError: …`` as they always did.
"""

from __future__ import annotations


class Stage2Error(Exception):
    """Base of every error stage 2 raises on purpose."""


class DatasetError(Stage2Error, ValueError):
    """The shards (or a split file) cannot be trained on as they are: no labels, one class, …"""


class RunDirError(Stage2Error, FileNotFoundError):
    """Not a complete stage-2 run directory, or a directory training must not replace."""


class BackendError(Stage2Error, RuntimeError):
    """Keras is (or would be) running on another backend than torch."""


class ExportError(Stage2Error, RuntimeError):
    """The merged model does not reproduce the two-stage path, or the head cannot be converted."""


class ExplainError(Stage2Error, ValueError):
    """A heatmap cannot be made for this run or this target (a backbone without a feature map, an unknown class)."""


class DoctorError(DatasetError):
    """The doctor cannot run on these inputs as given (no shards, an out-of-fold file that does not match, …)."""


for _error in (Stage2Error, DatasetError, RunDirError, BackendError, ExportError, ExplainError, DoctorError):
    _error.__module__ = "stage2_classify"
del _error
