"""The scorer registry. A scorer module registers its classes with `@register`; `RoutingConfig(scorer=...)`
names one. Third parties register their own the same way."""

from __future__ import annotations

from typing import Any

from visroute.scoring.base import Scorer, StageContext

_REGISTRY: dict[str, type[Scorer]] = {}


def register(cls: type[Scorer]) -> type[Scorer]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`")
    _REGISTRY[cls.name] = cls
    return cls


def get_scorer_class(name: str) -> type[Scorer]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"Unknown scorer {name!r}; registered scorers: {', '.join(sorted(_REGISTRY))}") from None


def build_scorer(name: str, options: dict[str, Any] | None = None) -> Scorer:
    return get_scorer_class(name)(**(options or {}))


def available_scorers() -> dict[str, type[Scorer]]:
    return dict(sorted(_REGISTRY.items()))


# Importing the modules registers their scorers.
from visroute.scoring import attention as _attention  # noqa: E402,F401
from visroute.scoring import controls as _controls  # noqa: E402,F401
from visroute.scoring import redundancy as _redundancy  # noqa: E402,F401
from visroute.scoring import similarity as _similarity  # noqa: E402,F401
from visroute.scoring import vision as _vision  # noqa: E402,F401

__all__ = ["Scorer", "StageContext", "register", "get_scorer_class", "build_scorer", "available_scorers"]
