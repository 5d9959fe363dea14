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
