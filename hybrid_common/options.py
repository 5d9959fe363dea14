"""Options defined once: a dataclass field carries its default, its CLI flag, help text, parser and old spellings.

Every CLI builds its flags from the dataclasses (``add_options``) and turns the parsed namespace back into one
(``options_from_args``), so a default, a choice list or a help text exists in one place only::

    @dataclasses.dataclass
    class TrainOptions:
        epochs: int = option(50, help="maximum epochs")
        batch_size: int = option(256, help="…", flag="--batch-size")

    add_options(parser, TrainOptions, only=("epochs", "batch_size"))
    opts = options_from_args(TrainOptions, args)
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Iterable, Sequence

_KEY = "hybrid_common.option"


def option(default: Any = dataclasses.MISSING, *, help: str, flag: str | None = None,
           aliases: Sequence[str] = (), choices: Sequence[Any] | None = None,
           parse: Callable[[str], Any] | None = None, metavar: str | None = None,
           default_factory: Callable[[], Any] | None = None, action: str | None = None) -> Any:
    """A dataclass field with its command-line flag.

    ``flag`` defaults to ``--field-name``; ``aliases`` are old spellings that keep working (argparse lists them
    beside the flag in ``--help``, once); ``parse`` turns the text into the value (default: the default's type);
    ``action="store_true"`` makes a switch. The help text gets ``(default …)`` appended unless it says it already.
    """
    meta = {_KEY: {"help": help, "flag": flag, "aliases": tuple(aliases), "choices": choices, "parse": parse,
                   "metavar": metavar, "action": action}}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _flag(field: dataclasses.Field) -> str:
    return field.metadata[_KEY]["flag"] or "--" + field.name.replace("_", "-")


def _dest(field: dataclasses.Field, flags: dict[str, str]) -> str:
    """Where argparse keeps a field's value: its name, or the renamed flag's name (``--train-batch-size`` →
    ``train_batch_size``), so two options of one name from two classes do not overwrite each other."""
    renamed = flags.get(field.name)
    return renamed.lstrip("-").replace("-", "_") if renamed else field.name


def _fields(cls, only: Iterable[str] | None, exclude: Iterable[str]) -> list[dataclasses.Field]:
    declared = [f for f in dataclasses.fields(cls) if _KEY in f.metadata]
    names = {f.name for f in declared}
    wanted = list(only) if only is not None else [f.name for f in declared]
    unknown = (set(wanted) | set(exclude)) - names
    if unknown:
        raise ValueError(f"{cls.__name__} has no command-line option {sorted(unknown)}")
    by_name = {f.name: f for f in declared}
    return [by_name[n] for n in wanted if n not in set(exclude)]


def _default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _shown(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "x".join(map(str, value)) if value else "none"
    return str(value)


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls, *,
                only: Iterable[str] | None = None, exclude: Iterable[str] = (),
                required: Iterable[str] = (), defaults: dict[str, Any] | None = None,
                help: dict[str, str] | None = None, flags: dict[str, str] | None = None) -> None:
    """Add the flags of ``cls``'s fields (all, or ``only`` these) to ``parser``.

    ``required`` makes flags mandatory; ``defaults`` and ``help`` override a field's default or help text for this
    one command (a flag that means the same but defaults differently there); ``flags`` renames a flag for one
    command where two options would otherwise share it (the pipeline's ``--train-batch-size``).
    """
    required, defaults, help, flags = set(required), defaults or {}, help or {}, flags or {}
    for field in _fields(cls, only, exclude):
        meta = field.metadata[_KEY]
        default = defaults.get(field.name, _default_of(field))
        text = help.get(field.name, meta["help"])
        kwargs: dict[str, Any] = {"dest": _dest(field, flags)}
        if meta["action"]:
            kwargs["action"] = meta["action"]
        else:
            kind = meta["parse"] or (type(default) if isinstance(default, (int, float, str)) and
                                     not isinstance(default, bool) else None)
            if kind is not None:
                kwargs["type"] = kind
            if meta["choices"] is not None:
                kwargs["choices"] = list(meta["choices"])
            if meta["metavar"]:
                kwargs["metavar"] = meta["metavar"]
            if field.name in required:
                kwargs["required"] = True
            elif default is not None and "default" not in text:
                text = f"{text} (default {_shown(default)})"
        kwargs["default"] = None if field.name in required else default
        parser.add_argument(flags.get(field.name, _flag(field)), *meta["aliases"], help=text, **kwargs)


def options_from_args(cls, args: argparse.Namespace, *, only: Iterable[str] | None = None,
                      flags: dict[str, str] | None = None, **overrides: Any):
    """An instance of ``cls`` from the parsed flags: every field whose flag was added (or ``only`` these; pass
    the ``flags`` given to :func:`add_options`), plus ``overrides``; the other fields keep their defaults."""
    flags = flags or {}
    fields = [f for f in dataclasses.fields(cls) if only is None or f.name in set(only)]
    values = {f.name: getattr(args, _dest(f, flags)) for f in fields if hasattr(args, _dest(f, flags))}
    values.update(overrides)
    return cls(**values)


def add_progress_flag(parser: argparse.ArgumentParser) -> None:
    """The one progress switch of every command: ``--no-progress`` (old spelling ``--quiet``) → ``args.progress``."""
    parser.add_argument("--no-progress", "--quiet", dest="progress", action="store_false",
                        help="no progress bars or per-epoch lines (the final summary is still printed)")
