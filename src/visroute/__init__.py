"""visroute: prune or reroute the visual tokens a vision-language model's decoder carries.

    from visroute import RoutingConfig, Stage, apply_routing
    cfg = RoutingConfig(action="reroute", scorer="last_token_attention",
                        stages=[Stage(layer=2, keep=0.5), Stage(layer=7, keep=0.25)])
    with apply_routing(model, cfg) as router:
        model.generate(**inputs)
        record = router.last_record
"""

from visroute.config import RoutingConfig, Stage
from visroute.engine import Router, RoutedCache, apply_routing
from visroute.record import RoutingRecord, StageRecord

__version__ = "0.1.0"

__all__ = ["RoutingConfig", "Stage", "apply_routing", "Router", "RoutedCache", "RoutingRecord", "StageRecord"]
