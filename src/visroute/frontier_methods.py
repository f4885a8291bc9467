"""The 2025 "important and diverse before the LLM" methods as named methods: VisPruner, CDPruner, HoloV and SCOPE.
Each prunes once, before the decoder (a layer-0 stage: the decoder never sees the dropped tokens), keeping the
tier's count, so avg_T is the tier exactly (the tier rounded to an integer). `visroute.methods` registers them;
their scorers (`visroute.scoring.frontier`) say how each follows its released code and where it departs.

The released settings at LLaVA-1.5's 64 / 128 / 192 tokens: VisPruner keeps half by importance (`--important_ratio
0.5`, its scripts' default) at every tier; CDPruner, HoloV and SCOPE have no per-tier setting beyond the count
(HoloV's crop count follows the count, see `selection.holov_crops`). On every other family the same rule runs on
that family's signals: attention received instead of [CLS] attention where the tower has no [CLS], the decoder
input embeddings as features where there is no projector input per visual token.
"""

from __future__ import annotations

import math
from typing import Callable

from visroute.config import RoutingConfig, Stage

VISPRUNER_IMPORTANT_RATIO = 0.5


def _layer0(scorer: str, options: dict | None = None) -> Callable[..., RoutingConfig]:
    def build(tier: float, num_layers: int, num_visual: int, family: str | None, opts=None) -> RoutingConfig:
        keep = int(math.floor(tier + 0.5))
        return RoutingConfig("prune", scorer, [Stage(0, keep)], scorer_options=dict(options or {}))
    return build


# (name, description, builder): `visroute.methods` wraps each in a `Method`.
FRONTIER_METHODS = (
    ("vispruner", "VisPruner (Zhang et al., ICCV 2025; released code): before the decoder, per image half the keep "
     "by the tower's [CLS] attention (no [CLS]: attention received), the other half by iterative cosine "
     "de-duplication of the rest in the tower's feature space (no projector input: the decoder input embeddings)",
     _layer0("vispruner", {"important_ratio": VISPRUNER_IMPORTANT_RATIO})),
    ("cdpruner", "CDPruner (Zhang et al., NeurIPS 2025; released code): before the decoder, per image the greedy MAP "
     "of a DPP with kernel diag(r) S diag(r), S the cosine of the projected tokens; r the relevance to the "
     "instruction measured with the decoder's input embeddings (the released LLaVA code uses CLIP's text tower, "
     "which the checkpoints do not carry)", _layer0("cdpruner")),
    ("holov", "HoloV (Zou et al., NeurIPS 2025; released code): before the decoder, each image cut into "
     "max(1, int(1024/576 x N / k)) contiguous crops with quotas by mean scaled attention + 0.09 x scaled "
     "similarity variance of the projected tokens, each crop keeping its quota by attention", _layer0("holov")),
    ("scope", "SCOPE (Deng et al., NeurIPS 2025; released code): before the decoder, per image greedy [CLS] "
     "attention x facility-location coverage gain over the tower's features", _layer0("scope")),
)

__all__ = ["FRONTIER_METHODS", "VISPRUNER_IMPORTANT_RATIO"]
