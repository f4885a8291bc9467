"""The Reroute variants of FastV, PyramidDrop and Nüwa: the base method's per-layer counts (or its avg_T exactly),
re-decided over the visual tokens at several layers, with tokens carried rather than dropped (action "reroute").
Options (`NAME@TIER:key=value`): `scoring` ("decision": re-selections scored at the decision layer itself, as the
Reroute reference code, elmma/mllm-reroute `models/router.py`; "previous": at layer l-1) and `reentry` (the
re-entry policy, `visroute.reentry`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from visroute.budget import (
    FASTV_LAYER,
    PDROP_LAYERS,
    REROUTE_FASTV_RESELECT,
    REROUTE_PDROP_WEIGHTS,
    Shape,
    scale_layers,
    schedule_avg_T,
    solve,
)
from visroute.config import RoutingConfig, Stage
from visroute.methods import Method, register_method
from visroute.methods import pdrop
from visroute.methods.fastv import fastv_keep
from visroute.methods.nuwa import NuwaPlan, nuwa_plan, nuwa_stage1
from visroute.options import option

SCORING = ("decision", "previous")
REROUTE_NUWA_DECISIONS = 4  # stage 2's budget re-decided this many times over the second part of the decoder


@dataclass(frozen=True)
class RerouteOptions:
    """Options of the Reroute variants (see the module docstring)."""

    scoring: str = option("decision", "where re-selections take their scores: the decision layer itself (the "
                          "Reroute reference code) or the layer before it (FastV's K-1)", choices=SCORING)
    reentry: str = option("reference", "re-entry policy of the reroute stages (visroute.reentry)")

    def __post_init__(self):
        from visroute.reentry import get_reentry_class

        get_reentry_class(self.reentry)  # an unknown policy names the registered ones


def _rescored(first: Stage, later: list[Stage], opts: RerouteOptions) -> list[Stage]:
    """The first decision as the base method scores it; the re-selections at the decision layer itself, or at
    the layer before it (`scoring="previous"`)."""
    if opts.scoring == "previous":
        later = [Stage(s.layer, s.keep, score_layer=s.layer - 1) for s in later]
    return [first, *later]


def _reroute_config(stages: list[Stage], opts: RerouteOptions, **kw) -> RoutingConfig:
    return RoutingConfig("reroute", "last_token_attention", stages, reentry=opts.reentry, **kw)


def _reroute_fastv(tier, num_layers, num_visual, family, opts=None) -> RoutingConfig:
    keep = fastv_keep(tier, num_layers, num_visual)
    later = sorted({l for l in scale_layers(REROUTE_FASTV_RESELECT, num_layers) if l > FASTV_LAYER})
    first = Stage(FASTV_LAYER, keep, score_layer=FASTV_LAYER - 1)
    return _reroute_config(_rescored(first, [Stage(l, keep) for l in later], opts), opts)


def _exactly(shape: Shape, num_layers: int, num_visual: int, target: float):
    """Integer keeps of `shape` whose avg_T equals `target` (a base method's achieved avg_T), or None."""
    for radius in (3, 8, 16):
        sol = solve(shape, num_layers, num_visual, target, radius=radius)
        if abs(sol.avg_T - target) < 1e-9:
            return sol
    return None


def _reroute_pdrop(tier, num_layers, num_visual, family, opts=None) -> RoutingConfig:
    base = pdrop.build(tier, num_layers, num_visual, family)
    target = schedule_avg_T(base, num_layers, num_visual)
    layers = scale_layers(PDROP_LAYERS, num_layers)
    sol = _exactly(Shape.weighted(layers, REROUTE_PDROP_WEIGHTS), num_layers, num_visual, target)
    # no [a, a, a/2, a/4] keeps landing on the base's avg_T: its own counts, re-selected
    stages = [Stage(s.layer, s.keep) for s in (base.stages if sol is None else sol.stages)]
    return _reroute_config(_rescored(stages[0], stages[1:], opts), opts)


def reroute_nuwa_layers(layer2: int, num_layers: int, decisions: int = REROUTE_NUWA_DECISIONS) -> list[int]:
    """Stage 2's decisions: `layer2` and then evenly over the layers after it (LLaVA-1.5: 16, 20, 24, 28)."""
    span = num_layers - layer2
    return sorted({layer2 + int(math.floor(i * span / decisions + 0.5)) for i in range(decisions)})


def _nuwa_decisions(plan: NuwaPlan, num_layers: int, opts: RerouteOptions) -> list[Stage]:
    """Stage 2's decisions: the first scored as Nüwa scores stage 2 (one layer before), the others by `scoring`."""
    layers = reroute_nuwa_layers(plan.layer2, num_layers)
    first = Stage(layers[0], plan.keep2, score_layer=layers[0] - 1)
    return _rescored(first, [Stage(l, plan.keep2) for l in layers[1:]], opts)


def _reroute_nuwa(tier, num_layers, num_visual, family, opts=None) -> RoutingConfig:
    plan = nuwa_plan(tier, num_layers, num_visual, family)
    stage1 = dataclasses.replace(nuwa_stage1(plan, family), action="prune")
    return _reroute_config([stage1, *_nuwa_decisions(plan, num_layers, opts)], opts,
                           scorer_options=plan.stage2_options)


def _reroute_nuwa_layer0(tier, num_layers, num_visual, family, opts=None) -> RoutingConfig:
    plan = nuwa_plan(tier, num_layers, num_visual, family)
    return _reroute_config([nuwa_stage1(plan, family), *_nuwa_decisions(plan, num_layers, opts)], opts,
                           scorer_options=plan.stage2_options)


register_method(Method(
    "reroute-fastv", "Reroute matched to FastV (the reference's ours_vs_fastv): FastV's keep re-selected at "
    "[3, 7, 15, 23] (scaled) over all visual tokens; the first decision scored as FastV scores it (layer 2 "
    "for 3), the re-selections at their own layer as the reference code does (scoring=previous: at l-1)",
    _reroute_fastv, base="fastv", Options=RerouteOptions))
register_method(Method(
    "reroute-pdrop", "Reroute matched to PyramidDrop (the reference's ours_vs_pdrop): keeps [a, a, a/2, a/4] at "
    "[2, 7, 15, 23] (scaled), reroute, solved to exactly PyramidDrop's avg_T; every decision scored at its "
    "own layer (scoring=previous: re-selections at l-1). Its schedule differs from PyramidDrop's geometric "
    "one, so compare it with prune on the same schedule too (the study's 2 x 2)", _reroute_pdrop,
    base="pdrop", Options=RerouteOptions))
register_method(Method(
    "reroute-nuwa", "Reroute matched to Nüwa (the Reroute reference code has no Nüwa variant; this is the "
    "closest reading of 'Nüwa + Reroute'): Nüwa's stage 1 as released (regional [CLS] selection and merge "
    "before the decoder, a prune), then stage 2's budget K2 re-decided at 4 layers (LLaVA-1.5: 16, 20, 24, "
    "28) among the K1 survivors, rerouted; the first decision scored as Nüwa scores stage 2 (one layer "
    "before), the others at their own layer (scoring=previous: at l-1). Nüwa's per-layer counts and avg_T",
    _reroute_nuwa, base="nuwa", Options=RerouteOptions))
register_method(Method(
    "reroute-nuwa-layer0", "Reroute matched to Nüwa, routing from layer 0 (visroute's earlier design): stage "
    "1 is a routing stage too (kept tokens enter merged; the others are carried with their own unmerged "
    "embedding and may re-enter at any later decision), and stage 2's K2 is re-decided at 4 layers over all "
    "visual tokens, scored as reroute-nuwa's: Nüwa's per-layer counts and avg_T", _reroute_nuwa_layer0,
    base="nuwa", Options=RerouteOptions))
