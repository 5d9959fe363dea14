"""Keyword arguments renamed for the glossary (``docs/glossary.md``) keep their old spelling, with a warning."""

from __future__ import annotations

import functools
import warnings


def renamed_keywords(**old_to_new: str):
    """Decorator: ``@renamed_keywords(model="run")`` accepts ``model=`` for ``run=`` and warns once per call site."""

    def wrap(function):
        @functools.wraps(function)
        def call(*args, **kwargs):
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{function.__name__}() got both {old}= (the old name) and {new}=")
                    warnings.warn(f"{function.__name__}({old}=…) is now {new}=…; the old name still works",
                                  DeprecationWarning, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        return call

    return wrap
