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

from typing import Any

from visroute.registry import Registry
from visroute.scoring.base import NoOptions, Scorer, StageContext, option

ENTRY_POINT_GROUP = "visroute.scorers"
REGISTRY: Registry = Registry("scorer", Scorer, ENTRY_POINT_GROUP)
_REGISTRY = REGISTRY.entries


def register(cls: type[Scorer]) -> type[Scorer]:
    """Register a scorer class (a decorator). A name another scorer already holds is an error."""
    REGISTRY.register(cls)
    cls.option_specs()  # an Options class that is not a dataclass fails here, at registration
    return cls


def get_scorer_class(name: str) -> type[Scorer]:
    return REGISTRY.get(name)


def build_scorer(name: str, options: dict[str, Any] | None = None) -> Scorer:
    return get_scorer_class(name)(**(options or {}))


def available_scorers() -> dict[str, type[Scorer]]:
    return REGISTRY.available()


# Importing the modules registers their scorers.
from visroute.scoring import attention as _attention  # noqa: E402,F401
from visroute.scoring import controls as _controls  # noqa: E402,F401
from visroute.scoring import redundancy as _redundancy  # noqa: E402,F401
from visroute.scoring import similarity as _similarity  # noqa: E402,F401
from visroute.scoring import vision as _vision  # noqa: E402,F401
from visroute.scoring import nuwa as _nuwa  # noqa: E402,F401
from visroute.scoring import visionzip as _visionzip  # noqa: E402,F401
from visroute.scoring import frontier as _frontier  # noqa: E402,F401

__all__ = ["NoOptions", "Scorer", "StageContext", "available_scorers", "build_scorer", "get_scorer_class",
           "option", "register"]
