"""Nüwa (arXiv 2602.02951, released code): before the decoder the regional rule on the tower's attention and the
region-cohesion merge (scorer and merge `nuwa`, `visroute.scoring.nuwa`), then last-prompt-token attention at a
middle layer. The variant (LLaVA-1.5 or Qwen2.5-VL constants) is the family's `nuwa_variant`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from visroute.budget import Shape, solve
from visroute.config import RoutingConfig, Stage
from visroute.methods import Method, nearest, register_method
from visroute.scoring.nuwa import family_variant

# LLaVA-1.5 (clip_encoder.py, modeling_llama.py): stage 2 at layer 16 of 32 scored at 15, keeping K1 / 7
# (112 -> 16, 224 -> 32, 336 -> 48), top-n = 1 / 2 / 3 (as many as the 144 regions must give).
# Qwen2.5-VL (qwen2_5vl_nuwa.py `prune_config`): target ratio -> (s1, s2, top-n); stage 2 after layer 14 of 28.
NUWA_QWEN = {0.25: (0.35, 0.42, 3), 0.5: (0.6, 0.66, 3), 0.75: (0.85, 0.7, 4)}
# The variant is the family's `nuwa_variant` (visroute.scoring.nuwa.family_variant). Nüwa's code covers LLaVA-1.5
# and Qwen2.5-VL only; Qwen2-VL and Qwen3-VL (a ViT with a patch merger, no [CLS]) take the Qwen variant by analogy,
# every other family (LLaVA-NeXT and OneVision: CLIP / SigLIP towers, merged in the decoder's input space) the LLaVA one.


@dataclass(frozen=True)
class NuwaPlan:
    """The solved Nüwa schedule: K1 tokens from layer 0 (regional rule, `top_n`, merged), K2 from `layer2`,
    scored at `layer2 - 1` with the stage-2 scorer options."""

    keep1: int
    keep2: int
    layer2: int
    top_n: int
    variant: str
    stage2_options: dict


def nuwa_plan(tier: float, num_layers: int, num_visual: int, family: str | None = None) -> NuwaPlan:
    variant = family_variant(family)
    if variant == "qwen":
        _, ratio2, top_n = NUWA_QWEN[nearest(tier / num_visual, NUWA_QWEN)]
        layer2 = min(num_layers - 1, max(1, int(math.floor(15 * num_layers / 28 + 0.5))))
        options = {"queries": 3, "heads": "max"}
    else:
        ratio2, top_n = 1 / 7, None
        layer2 = min(num_layers - 1, max(1, int(math.floor(16 * num_layers / 32 + 0.5))))
        options = {}
    sol = solve(Shape.weighted([0, layer2], [1.0, ratio2]), num_layers, num_visual, tier)
    keep1, keep2 = sol.keeps
    regions = math.ceil(num_visual / 4)  # 2x2 regions of the image's grid (even sides; odd ones have a few more)
    need = min(4, max(1, math.ceil(keep1 / regions)))
    top_n = need if top_n is None else max(top_n, need)
    return NuwaPlan(keep1, keep2, layer2, top_n, variant, options)


def nuwa_stage1(plan: NuwaPlan, family: str | None) -> Stage:
    merge_options = {"variant": plan.variant} if family is not None else {}
    return Stage(0, plan.keep1, scorer="nuwa", scorer_options={"top_n": plan.top_n}, merge="nuwa",
                 merge_options=merge_options)


def build(tier, num_layers, num_visual, family, opts=None) -> RoutingConfig:
    plan = nuwa_plan(tier, num_layers, num_visual, family)
    return RoutingConfig("prune", "last_token_attention",
                         [nuwa_stage1(plan, family), Stage(plan.layer2, plan.keep2, score_layer=plan.layer2 - 1)],
                         scorer_options=plan.stage2_options)


register_method(Method(
    "nuwa", "Nüwa (released code): before the decoder, vision-tower [CLS] attention (Qwen: attention received) with "
    "the 2x2 regional rule and the region-cohesion merge; then last-prompt-token attention scored one layer before "
    "stage 2 acts (LLaVA-1.5: layer 15 for 16, mean over heads, K2 = K1/7: 112 + 16, 224 + 32, 336 + 48 give avg_T "
    "64 / 128 / 192 exactly; Qwen2.5-VL: layer 14 for 15, the last 3 text tokens, max over heads, its released "
    "ratios solved to the tier); the budget split per image", build))
