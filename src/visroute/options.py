"""Typed options for the pieces a config names (scorers, merges, tasks): each declares an `Options` dataclass
whose fields are `option(default, help, choices=...)`; `build_options` turns a plain dict into it, checking
names, types and choices, with errors that name the option."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar


def option(default: Any, help: str, choices: tuple | None = None) -> Any:
    """An option: its default, a one-line help and, optionally, the values it may take."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class NoOptions:
    """Takes no options."""


@dataclass(frozen=True)
class OptionSpec:
    """One declared option, as the command line lists it."""

    name: str
    type: str
    default: Any
    help: str
    choices: tuple | None


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _fits(value: Any, tp: Any) -> bool:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is Any:
        return True
    return isinstance(value, typing.get_origin(tp) or tp)


class HasOptions:
    """Mixin: `name`, `kind` (what it is, for messages) and an `Options` dataclass."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "component"
    Options: ClassVar[type] = NoOptions

    @classmethod
    def option_specs(cls) -> list[OptionSpec]:
        hints = typing.get_type_hints(cls.Options)
        return [OptionSpec(f.name, _type_name(hints[f.name]), f.default, f.metadata.get("help", ""),
                           f.metadata.get("choices")) for f in dataclasses.fields(cls.Options)]

    @classmethod
    def build_options(cls, options: dict[str, Any] | None) -> Any:
        """`Options` from a plain dict, checked: unknown names, wrong types and values outside an option's
        choices are errors that name the option."""
        options = dict(options or {})
        specs = {s.name: s for s in cls.option_specs()}
        unknown = sorted(set(options) - set(specs))
        if unknown:
            known = ", ".join(specs) or "none"
            raise ValueError(f"Unknown option(s) {unknown} for {cls.kind} {cls.name!r}; it takes: {known}")
        hints = typing.get_type_hints(cls.Options)
        for key, value in options.items():
            spec = specs[key]
            if not _fits(value, hints[key]):
                raise ValueError(f"Option {key!r} of {cls.kind} {cls.name!r} must be {spec.type}, got {value!r}")
            if spec.choices is not None and value not in spec.choices:
                raise ValueError(f"Option {key!r} of {cls.kind} {cls.name!r} must be one of {list(spec.choices)}, "
                                 f"got {value!r}")
        try:
            return cls.Options(**options)
        except ValueError as e:  # the options' own checks (ranges)
            raise ValueError(f"{cls.kind.capitalize()} {cls.name!r}: {e}") from None

    @classmethod
    def check_options(cls, options: dict[str, Any] | None) -> None:
        cls.build_options(options)
