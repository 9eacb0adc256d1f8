"""Settings declared once, as dataclasses, and turned into command-line flags.

A field becomes `--field-name`; its help is `field(metadata={"help": ...})`; its type gives the
parser (bool fields get `--x/--no-x`, `Literal[...]` fields get choices, `list[X]` fields take the
flag once per item, `X | None` fields accept a value or keep None). `values(cls, args)` builds the
dataclass back from the parsed flags, so a recipe takes one object instead of a list of keywords
and every recipe sees every setting.

A field's metadata (or, for a dataclass this command does not own, the `help=`, `names=` and
`parsers=` arguments of `add_flags`) may also say how the command line spells it: "flag" (its
flag name, e.g. `--time-budget`), "aliases" (older spellings that keep working), "parse" (a
function from the typed text to the field's value, e.g. minutes to seconds) and "metavar".

Every flag's help ends with its default, unless the help text already states one.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from typing import Any, Callable, Iterable, NoReturn, TypeVar

T = TypeVar("T")
GIVEN = "_given_flags"  # the namespace attribute `given_flags` reads


class CommandParser(argparse.ArgumentParser):
    """The parser of every `ember` command.

    Bad flags end as one line on stderr (`error: ...`) and exit status 2, like every other
    problem a user can fix. A parser made with `build=` adds its own flags only when it is
    used (parsing or `--help`), so building `ember`'s whole command tree imports nothing heavy.
    """

    def __init__(self, *args: Any, build: Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._build = build
        self._typed: set[str] = set()

    def ensure_built(self) -> "CommandParser":
        if self._build is not None:
            build, self._build = self._build, None
            build(self)
        return self

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self.ensure_built()
        self._typed = set()
        parsed, rest = super().parse_known_args(args, namespace)
        setattr(parsed, GIVEN, set(getattr(parsed, GIVEN, ())) | self._typed)  # a subcommand's, then ours
        return parsed, rest

    def _get_values(self, action: argparse.Action, arg_strings: list[str]) -> Any:
        self._typed.add(action.dest)  # argparse converts the values of exactly the flags typed
        return super()._get_values(action, arg_strings)

    def format_help(self) -> str:
        self.ensure_built()
        return super().format_help()

    def format_usage(self) -> str:
        self.ensure_built()
        return super().format_usage()

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {self.prog}: {message.rstrip('.')}; see `{self.prog} --help`.\n")
        sys.exit(2)


class _Switch(argparse.BooleanOptionalAction):
    """`--x/--no-x`, with the help text as given (argparse's own appends a second default)."""

    def __init__(self, *args: Any, help: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, help=help, **kwargs)
        self.help = help


def add_command(sub: argparse._SubParsersAction, name: str, build: Callable[[argparse.ArgumentParser], None],
                **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand whose flags `build(parser)` adds: when first used under `CommandParser`, at
    once under a plain `argparse` parser."""
    if isinstance(sub._parser_class, type) and issubclass(sub._parser_class, CommandParser):
        return sub.add_parser(name, build=build, **kwargs)
    parser = sub.add_parser(name, **kwargs)
    build(parser)
    return parser


def flag_name(field_name: str, prefix: str = "") -> str:
    return "--" + (prefix + field_name).replace("_", "-")


def _parser_type(tp: Any) -> tuple[Any, tuple[Any, ...] | None, bool, bool]:
    """(argparse type, choices, is_bool, is_list) for a field's annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _parser_type(args[0]) if len(args) == 1 else (str, None, False, False)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        return type(choices[0]), choices, False, False
    if origin is list:
        (item,) = typing.get_args(tp) or (str,)
        return (item if item in (int, float, str) else str), None, False, True
    if tp is bool:
        return bool, None, True, False
    if tp in (int, float, str):
        return tp, None, False, False
    return str, None, False, False


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _shown(default: Any) -> str:
    if default is None:
        return "none"
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, list):
        return ",".join(map(str, default)) or "none"
    return f"{default:g}" if isinstance(default, float) else str(default)


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
              only: Iterable[str] | None = None, exclude: Iterable[str] = (), prefix: str = "",
              defaults: dict[str, Any] | None = None, help: dict[str, str] | None = None,
              names: dict[str, str | tuple[str, ...]] | None = None,
              parsers: dict[str, Callable[[str], Any]] | None = None) -> None:
    """One flag per field of the dataclass `cls` (all, or `only` these, minus `exclude`).

    `defaults` overrides a field's default for this command (finetune's learning rate, say);
    `help`, `names` and `parsers` give a field's help text, flag name and value parser where its
    own metadata does not (a dataclass owned elsewhere); a name may be a tuple of spellings, the
    first shown first. The flag's dest is always `prefix + field name`. Naming a field that does
    not exist is a mistake, except in `exclude` (a field may be gone from a dataclass owned elsewhere).
    """
    hints = typing.get_type_hints(cls)
    wanted = set(only) if only is not None else None
    excluded = set(exclude)
    known = {f.name for f in dataclasses.fields(cls)}
    for given in (wanted or set()) | set(defaults or {}) | set(help or {}) | set(names or {}) | set(parsers or {}):
        if given not in known:
            raise ValueError(f"{cls.__name__} has no field '{given}'")
    for f in dataclasses.fields(cls):
        if f.name in excluded or (wanted is not None and f.name not in wanted) or not f.init:
            continue
        kind, choices, is_bool, is_list = _parser_type(hints[f.name])
        meta = f.metadata
        default = (defaults or {}).get(f.name, _default(f))
        text = (help or {}).get(f.name, meta.get("help", ""))
        if "default" not in text:
            text = f"{text} (default: {_shown(default)})" if text else f"default: {_shown(default)}"
        spelled = (names or {}).get(f.name) or meta.get("flag") or flag_name(f.name, prefix)
        spellings = [spelled] if isinstance(spelled, str) else list(spelled)
        kwargs: dict[str, Any] = {"dest": prefix + f.name, "default": default, "help": text.replace("%", "%%")}
        parse = (parsers or {}).get(f.name, meta.get("parse"))
        if is_bool and parse is None:
            kwargs["action"] = _Switch
        else:
            kwargs["type"] = parse or kind
            if is_list and parse is None:
                kwargs["action"] = "append"  # appends to a copy of the default, never to the default itself
            if choices and parse is None:
                kwargs["choices"] = choices
            metavar = meta.get("metavar") or (None if choices else {int: "N", float: "X"}.get(
                kwargs["type"], spellings[0].lstrip("-").replace("-", "_").upper()))
            if metavar:
                kwargs["metavar"] = metavar
        parser.add_argument(*spellings, *meta.get("aliases", ()), **kwargs)


def kwargs_of(cls: type, args: argparse.Namespace, prefix: str = "") -> dict[str, Any]:
    """The fields of `cls` that have a flag in `args`, by field name."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.init and hasattr(args, prefix + f.name):
            out[f.name] = getattr(args, prefix + f.name)
    return out


def values(cls: type[T], args: argparse.Namespace, prefix: str = "", **overrides: Any) -> T:
    """The dataclass `cls` from parsed flags (fields without a flag keep their defaults)."""
    return cls(**{**kwargs_of(cls, args, prefix), **overrides})


def given_flags(args: argparse.Namespace) -> set[str]:
    """The dests of the flags typed on the command line, as opposed to those left at their defaults
    (a `CommandParser` records them; `--resume` takes only these as changes to a run)."""
    return set(getattr(args, GIVEN, ()))
