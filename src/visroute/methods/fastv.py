"""FastV (Chen et al., ECCV 2024, "An Image is Worth 1/2 Tokens After Layer 2"): one prune stage at K = 3, ranked
by the last prompt token's attention of layer K-1."""

from __future__ import annotations

from visroute.budget import FASTV_LAYER, Shape, solve
from visroute.config import RoutingConfig, Stage
from visroute.methods import Method, register_method


def fastv_keep(tier: float, num_layers: int, num_visual: int) -> int:
    """FastV's one keep, solved to the tier."""
    return solve(Shape.fastv(FASTV_LAYER), num_layers, num_visual, tier).keeps[0]


def build(tier, num_layers, num_visual, family, opts=None) -> RoutingConfig:
    keep = fastv_keep(tier, num_layers, num_visual)
    return RoutingConfig("prune", "last_token_attention", [Stage(FASTV_LAYER, keep, score_layer=FASTV_LAYER - 1)])


register_method(Method(
    "fastv", "FastV (Chen et al., 2024): K=3, prune; last-prompt-token attention, mean over heads, scored with layer "
    "2's attention (K-1, as FastV does) and dropped before layer 3; one keep solved to the tier", build))
