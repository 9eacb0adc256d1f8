"""Settings declared once, as dataclasses, and turned into command-line flags.

A field becomes `--field-name`; its help is `field(metadata={"help": ...})`; its type gives the
parser (bool fields get `--x/--no-x`, `Literal[...]` fields get choices, `X | None` fields accept a
value or keep None). `values(cls, args)` builds the dataclass back from the parsed flags, so a
recipe takes one object instead of a list of keywords and every recipe sees every setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Iterable, TypeVar

T = TypeVar("T")


def flag_name(field_name: str, prefix: str = "") -> str:
    return "--" + (prefix + field_name).replace("_", "-")


def _parser_type(tp: Any) -> tuple[Any, tuple[Any, ...] | None, bool]:
    """(argparse type, choices, is_bool) for a field's annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _parser_type(args[0]) if len(args) == 1 else (str, None, False)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        return type(choices[0]), choices, False
    if tp is bool:
        return bool, None, True
    if tp in (int, float, str):
        return tp, None, False
    return str, None, False


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
              only: Iterable[str] | None = None, exclude: Iterable[str] = (), prefix: str = "",
              defaults: dict[str, Any] | None = None) -> None:
    """One flag per field of the dataclass `cls` (all, or `only` these, minus `exclude`); `defaults`
    overrides a field's default for this command (finetune's learning rate, say)."""
    hints = typing.get_type_hints(cls)
    wanted = set(only) if only is not None else None
    for f in dataclasses.fields(cls):
        if f.name in exclude or (wanted is not None and f.name not in wanted) or not f.init:
            continue
        kind, choices, is_bool = _parser_type(hints[f.name])
        default = (defaults or {}).get(f.name, f.default if f.default is not dataclasses.MISSING
                                       else f.default_factory() if f.default_factory is not dataclasses.MISSING
                                       else None)
        text = f.metadata.get("help", "")
        shown = f"{text} (default: {default})" if text else f"default: {default}"
        kwargs: dict[str, Any] = {"dest": prefix + f.name, "default": default, "help": shown}
        if is_bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
            if choices:
                kwargs["choices"] = choices
            if f.metadata.get("metavar"):
                kwargs["metavar"] = f.metadata["metavar"]
        parser.add_argument(flag_name(f.name, prefix), **kwargs)


def values(cls: type[T], args: argparse.Namespace, prefix: str = "", **overrides: Any) -> T:
    """The dataclass `cls` from parsed flags (fields without a flag keep their defaults)."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.init and hasattr(args, prefix + f.name):
            kwargs[f.name] = getattr(args, prefix + f.name)
    kwargs.update(overrides)
    return cls(**kwargs)
