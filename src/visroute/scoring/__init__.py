"""The scorer registry. A scorer module registers its classes with `@register`; `RoutingConfig(scorer=...)`
names one.

    from visroute.scoring import Scorer, StageContext, register

    @register
    class Center(Scorer):
        name = "center"
        description = "keeps the tokens nearest the middle of the sequence"

        def score(self, ctx: StageContext):
            mid = ctx.layout.positions.float().mean(1, keepdim=True)
            return -(ctx.layout.positions.float() - mid).abs()

Third-party packages register theirs through the entry-point group `visroute.scorers` (the entry point names
the scorer class, or a module that registers its scorers when imported); they load the first time the
registry is read.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

from visroute.scoring.base import NoOptions, Scorer, StageContext, option

ENTRY_POINT_GROUP = "visroute.scorers"

_REGISTRY: dict[str, type[Scorer]] = {}
_entry_points_loaded = False


def register(cls: type[Scorer]) -> type[Scorer]:
    """Register a scorer class (a decorator). A name another scorer already holds is an error."""
    if not (isinstance(cls, type) and issubclass(cls, Scorer)):
        raise TypeError(f"register takes a Scorer subclass, not {cls!r}")
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`")
    if _REGISTRY.get(cls.name) is cls:
        return cls
    if cls.name in _REGISTRY:
        raise ValueError(f"A scorer named {cls.name!r} is already registered ({_REGISTRY[cls.name].__module__}."
                         f"{_REGISTRY[cls.name].__name__})")
    cls.option_specs()  # an Options class that is not a dataclass fails here, at registration
    _REGISTRY[cls.name] = cls
    return cls


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = ep.load()
        except Exception as e:  # a broken plug-in says which one it is
            raise ImportError(f"The scorer entry point {ep.name!r} ({ep.value}) failed to load: {e}") from e
        if isinstance(loaded, type) and issubclass(loaded, Scorer):
            register(loaded)


def get_scorer_class(name: str) -> type[Scorer]:
    _load_entry_points()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"Unknown scorer {name!r}; registered scorers: {', '.join(sorted(_REGISTRY))}") from None


def build_scorer(name: str, options: dict[str, Any] | None = None) -> Scorer:
    return get_scorer_class(name)(**(options or {}))


def available_scorers() -> dict[str, type[Scorer]]:
    _load_entry_points()
    return dict(sorted(_REGISTRY.items()))


# Importing the modules registers their scorers.
from visroute.scoring import attention as _attention  # noqa: E402,F401
from visroute.scoring import controls as _controls  # noqa: E402,F401
from visroute.scoring import redundancy as _redundancy  # noqa: E402,F401
from visroute.scoring import similarity as _similarity  # noqa: E402,F401
from visroute.scoring import vision as _vision  # noqa: E402,F401
from visroute.scoring import nuwa as _nuwa  # noqa: E402,F401
from visroute.scoring import visionzip as _visionzip  # noqa: E402,F401

__all__ = ["NoOptions", "Scorer", "StageContext", "available_scorers", "build_scorer", "get_scorer_class",
           "option", "register"]
