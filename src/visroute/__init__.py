"""visroute: prune or reroute the visual tokens a vision-language model's decoder carries.

    from visroute import RoutingConfig, Stage, apply_routing
    cfg = RoutingConfig(action="reroute", scorer="last_token_attention",
                        stages=[Stage(layer=2, keep=0.5), Stage(layer=7, keep=0.25)])
    with apply_routing(model, cfg) as router:
        model.generate(**inputs)
        record = router.last_record
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from visroute.lazy import lazy_exports

if TYPE_CHECKING:
    from visroute.config import RoutingConfig, Stage
    from visroute.engine import Router, RoutedCache, apply_routing
    from visroute.record import RoutingRecord, StageRecord

__version__ = "0.1.0"

# the public names load on first use (PEP 562), so that `visroute --help` does not import torch
_EXPORTS = {"RoutingConfig": "visroute.config", "Stage": "visroute.config", "apply_routing": "visroute.engine",
            "Router": "visroute.engine", "RoutedCache": "visroute.engine", "RoutingRecord": "visroute.record",
            "StageRecord": "visroute.record"}
__all__ = ["RoutingConfig", "Stage", "apply_routing", "Router", "RoutedCache", "RoutingRecord", "StageRecord"]


__getattr__ = lazy_exports(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
