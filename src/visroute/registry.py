"""One registry shape for everything a config names (scorers, merges, model families, tasks): name -> class,
filled by a decorator and, the first time it is read, by the classes third-party packages publish through an
entry-point group. A name another class holds is an error; so is a plug-in that fails to load (it names
itself)."""

from __future__ import annotations

import importlib.metadata
from typing import Callable, Generic, TypeVar

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """`kind` names what it holds in messages; classes must subclass `base`; `group` is the entry-point group;
    `builtins` imports the modules that register the built-in classes (run on first read); `check(cls,
    entries)` adds a registry's own refusals (e.g. a model class two families claim)."""

    def __init__(self, kind: str, base: type, group: str, builtins: Callable[[], None] | None = None,
                 check: Callable[[type, dict[str, type]], None] | None = None):
        self.kind, self.base, self.group = kind, base, group
        self.entries: dict[str, T] = {}
        self.loaded = False
        self._builtins = builtins
        self._check = check

    def register(self, cls: T, *aliases: str) -> T:
        """Register `cls` under its `name` (and `aliases`); usable as a decorator."""
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"a {self.kind} must be a {self.base.__name__} subclass, not {cls!r}")
        if not getattr(cls, "name", ""):
            raise ValueError(f"{cls.__name__} has no `name`")
        names = (cls.name, *aliases)
        if all(self.entries.get(n) is cls for n in names):
            return cls
        for n in names:
            if n in self.entries and self.entries[n] is not cls:
                held = self.entries[n]
                raise ValueError(f"A {self.kind} named {n!r} is already registered ({held.__module__}.{held.__name__})")
        if self._check is not None:
            self._check(cls, {k: v for k, v in self.entries.items() if v is not cls})
        for n in names:
            self.entries[n] = cls
        return cls

    def load(self) -> None:
        """Register the built-ins and the entry points' classes, once."""
        if self.loaded:
            return
        self.loaded = True
        if self._builtins is not None:
            self._builtins()
        for ep in importlib.metadata.entry_points(group=self.group):
            try:
                loaded = ep.load()
            except Exception as e:  # a broken plug-in says which one it is
                raise ImportError(f"The {self.kind} entry point {ep.name!r} ({ep.value}) failed to load: {e}") from e
            if isinstance(loaded, type) and issubclass(loaded, self.base):
                self.register(loaded)

    def get(self, name: str) -> T:
        self.load()
        try:
            return self.entries[name]
        except KeyError:
            raise ValueError(f"Unknown {self.kind} {name!r}; registered: {', '.join(sorted(self.entries))}") from None

    def available(self) -> dict[str, T]:
        self.load()
        return dict(sorted(self.entries.items()))
