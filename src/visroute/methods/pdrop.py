"""PyramidDrop (Xing et al., CVPR 2025): prune at [2, 7, 15, 23] of 32 layers with geometric keeps."""

from __future__ import annotations

from visroute.budget import PDROP_LAYERS, Shape, scale_layers, solve
from visroute.config import RoutingConfig
from visroute.methods import Method, register_method


def build(tier, num_layers, num_visual, family, opts=None) -> RoutingConfig:
    return solve(Shape.pdrop(scale_layers(PDROP_LAYERS, num_layers)), num_layers, num_visual, tier).config("prune")


register_method(Method(
    "pdrop", "PyramidDrop (Xing et al., 2025): prune at [2, 7, 15, 23] (scaled to the depth) with geometric keeps "
    "solved to the tier; last-token attention at each boundary layer itself", build))
