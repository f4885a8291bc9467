"""SparseVLM (Zhang et al., ICML 2025): instruction-token attention ranks the visual tokens at three layers, with
keeps in the proportions of its released LLaVA-1.5 lists."""

from __future__ import annotations

from visroute.budget import Shape, scale_layers, solve
from visroute.config import RoutingConfig, Stage
from visroute.methods import Method, nearest, register_method

SPARSEVLM_LAYERS = (2, 6, 15)  # the layers whose attention ranks; the kept set runs from the layer after
SPARSEVLM_KEEPS = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}  # its released LLaVA-1.5 lists


def build(tier, num_layers, num_visual, family, opts=None) -> RoutingConfig:
    counts = SPARSEVLM_KEEPS[nearest(tier, SPARSEVLM_KEEPS)]
    scored = scale_layers(SPARSEVLM_LAYERS, num_layers)
    layers = [l + 1 for l in scored]
    sol = solve(Shape.weighted(layers, [c / counts[0] for c in counts]), num_layers, num_visual, tier)
    stages = [Stage(l, k, score_layer=s) for l, k, s in zip(layers, sol.keeps, scored)]
    return RoutingConfig("prune", "text_attention", stages, scorer_options={"raters": True})


register_method(Method(
    "sparsevlm", "SparseVLM (Zhang et al., 2025): layers 2, 6, 15 (scaled) rank by the attention of the instruction "
    "tokens (text_attention with raters, mean over heads) and the kept set runs from the next layer; keeps in the "
    "proportions of its released lists for the nearest tier ([300, 200, 110], [303, 110, 36], [66, 30, 17]), "
    "solved to the tier. Left out: token recycling (merging some dropped tokens back) and its rank-adaptive keep "
    "counts", build))
