"""DART (Wen et al., 2025, "Stop Looking for Important Tokens..."): prune at layer 2 by duplication to pivots."""

from __future__ import annotations

from visroute.budget import Shape, solve
from visroute.config import RoutingConfig
from visroute.methods import Method, register_method

DART_LAYER = 2


def build(tier, num_layers, num_visual, family, opts=None) -> RoutingConfig:
    sol = solve(Shape.fastv(DART_LAYER), num_layers, num_visual, tier)
    return RoutingConfig("prune", "duplication", sol.stages, scorer_options={"pivot_visual": 4, "pivot_text": 4})


register_method(Method(
    "dart", "DART (Wen et al., 2025): prune at layer 2, keeping the tokens least similar to 4 visual + 4 text pivots "
    "(key L1 norm), one keep solved to the tier (DART's own settings keep the tier's count after layer 2, a higher "
    "avg_T); keys from layer 2's own projection (DART reads layer 1's cached keys)", build))
