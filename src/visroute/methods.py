"""Named methods: a published token-reduction method (or its Reroute variant) at an avg_T tier, solved into a
`RoutingConfig` for one model's number of decoder layers and one image's number of visual tokens.

    from visroute.methods import method_config, method_preset, methods
    cfg = method_config("nuwa@64", num_layers=32, num_visual=576)                 # LLaVA-1.5-7B
    cfg = method_config("pdrop@128", 28, 391, family="qwen2_5_vl")                 # Qwen2.5-VL-7B, a 640x480 image
    cfg = method_preset("reroute-nuwa", 64, "llava-1.5-7b")                        # by bench shape name
    cfg = method_config("reroute-fastv@128:scoring=previous:reentry=hysteresis", 32, 576)   # with options
    for name, m in methods().items(): print(name, m.description)

Every config is solved with integer keeps (`visroute.budget.solve`) so that its avg_T (the mean over decoder
layers of the visual tokens active in each layer) is the closest possible to the tier, and each Reroute variant
runs at exactly the avg_T of its base method. Stage layers are the papers' on a 32-layer decoder, scaled to other
depths by round(l x L / 32) (FastV's K = 3 is a fixed depth), except where a family has its own released
schedule (Nüwa on Qwen2.5-VL). `visroute.budget.preset` keeps the Reroute reference code's configs (scores taken
at the decision layer itself); the methods here follow each paper's own convention, said in each description.

The Reroute variants take options (`NAME@TIER:key=value:...`): `scoring` says where a re-selection takes its
scores: "decision" (default: the decision layer's own attention, as the Reroute reference code,
elmma/mllm-reroute `models/router.py`, scores every decision) or "previous" (layer l-1, FastV's K-1 convention
carried over); the first decision is always scored as the base method scores it. `reentry` names the re-entry
policy of the reroute stages (`visroute.reentry`; default "reference", the plain top keep).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

from visroute.budget import (
    FASTV_LAYER,
    PDROP_LAYERS,
    REROUTE_FASTV_RESELECT,
    REROUTE_PDROP_WEIGHTS,
    TIERS,
    Shape,
    scale_layers,
    schedule_avg_T,
    solve,
)
from visroute.config import RoutingConfig, Stage
from visroute.options import HasOptions, NoOptions, option
from visroute.scoring.nuwa import family_variant

Builder = Callable[[float, int, int, "str | None", Any], RoutingConfig]
SCORING = ("decision", "previous")


@dataclass(frozen=True)
class RerouteOptions:
    """Options of the Reroute variants (see the module docstring)."""

    scoring: str = option("decision", "where re-selections take their scores: the decision layer itself (the "
                          "Reroute reference code) or the layer before it (FastV's K-1)", choices=SCORING)
    reentry: str = option("reference", "re-entry policy of the reroute stages (visroute.reentry)")

    def __post_init__(self):
        from visroute.reentry import get_reentry_class

        get_reentry_class(self.reentry)  # an unknown policy names the registered ones


@dataclass(frozen=True)
class Method:
    """A named method. `config(tier, num_layers, num_visual, family, **options)` solves it; `base` is the method a
    Reroute variant is matched to (same avg_T), None for the others; `Options` its typed options."""

    name: str
    description: str
    build: Builder
    base: str | None = None
    Options: type = NoOptions

    def build_options(self, options: dict[str, Any] | None = None) -> Any:
        """The typed options from a plain dict; unknown names, wrong types and values are errors naming them."""
        holder = type("MethodOptions", (HasOptions,), {"name": self.name, "kind": "method", "Options": self.Options})
        return holder.build_options(options)

    def option_specs(self):
        holder = type("MethodOptions", (HasOptions,), {"name": self.name, "kind": "method", "Options": self.Options})
        return holder.option_specs()

    def config(self, tier: float, num_layers: int, num_visual: int, family: str | None = None,
               **options: Any) -> RoutingConfig:
        opts = self.build_options(options)
        if num_layers <= 0 or num_visual <= 0:
            raise ValueError(f"{self.name} needs a positive number of layers and visual tokens, got {num_layers} "
                             f"and {num_visual}")
        if not 0 < tier <= num_visual:
            raise ValueError(f"{self.name}@{tier:g} is out of reach: avg_T lies in (0, {num_visual}] for an image "
                             f"of {num_visual} visual tokens")
        return self.build(tier, num_layers, num_visual, family, opts)


# ---- FastV and PyramidDrop ---------------------------------------------------------------------------------------
def _fastv_keep(tier: float, num_layers: int, num_visual: int) -> int:
    return solve(Shape.fastv(FASTV_LAYER), num_layers, num_visual, tier).keeps[0]


def _fastv(tier, num_layers, num_visual, family, opts=None) -> RoutingConfig:
    keep = _fastv_keep(tier, num_layers, num_visual)
    return RoutingConfig("prune", "last_token_attention", [Stage(FASTV_LAYER, keep, score_layer=FASTV_LAYER - 1)])


def _rescored(first: Stage, later: list[Stage], opts: RerouteOptions) -> list[Stage]:
    """The first decision as the base method scores it; the re-selections at the decision layer itself, or at
    the layer before it (`scoring="previous"`)."""
    if opts.scoring == "previous":
        later = [Stage(s.layer, s.keep, score_layer=s.layer - 1) for s in later]
    return [first, *later]


def _reroute_config(stages: list[Stage], opts: RerouteOptions, **kw) -> RoutingConfig:
    return RoutingConfig("reroute", "last_token_attention", stages, reentry=opts.reentry, **kw)


def _reroute_fastv(tier, num_layers, num_visual, family, opts=None) -> RoutingConfig:
    keep = _fastv_keep(tier, num_layers, num_visual)
    later = sorted({l for l in scale_layers(REROUTE_FASTV_RESELECT, num_layers) if l > FASTV_LAYER})
    first = Stage(FASTV_LAYER, keep, score_layer=FASTV_LAYER - 1)
    return _reroute_config(_rescored(first, [Stage(l, keep) for l in later], opts), opts)


def _pdrop(tier, num_layers, num_visual, family, opts=None) -> RoutingConfig:
    return solve(Shape.pdrop(scale_layers(PDROP_LAYERS, num_layers)), num_layers, num_visual, tier).config("prune")


def _exactly(shape: Shape, num_layers: int, num_visual: int, target: float):
    """Integer keeps of `shape` whose avg_T equals `target` (a base method's achieved avg_T), or None."""
    for radius in (3, 8, 16):
        sol = solve(shape, num_layers, num_visual, target, radius=radius)
        if abs(sol.avg_T - target) < 1e-9:
            return sol
    return None


def _reroute_pdrop(tier, num_layers, num_visual, family, opts=None) -> RoutingConfig:
    base = _pdrop(tier, num_layers, num_visual, family)
    target = schedule_avg_T(base, num_layers, num_visual)
    layers = scale_layers(PDROP_LAYERS, num_layers)
    sol = _exactly(Shape.weighted(layers, REROUTE_PDROP_WEIGHTS), num_layers, num_visual, target)
    # no [a, a, a/2, a/4] keeps landing on the base's avg_T: its own counts, re-selected
    stages = [Stage(s.layer, s.keep) for s in (base.stages if sol is None else sol.stages)]
    return _reroute_config(_rescored(stages[0], stages[1:], opts), opts)


# ---- SparseVLM, VisionZip, DART, DivPrune ------------------------------------------------------------------------
SPARSEVLM_LAYERS = (2, 6, 15)  # the layers whose attention ranks; the kept set runs from the layer after
SPARSEVLM_KEEPS = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}  # its released LLaVA-1.5 lists


def _nearest(tier: float, table) -> int:
    return min(table, key=lambda t: (abs(t - tier), t))


def _sparsevlm(tier, num_layers, num_visual, family, opts=None) -> RoutingConfig:
    counts = SPARSEVLM_KEEPS[_nearest(tier, SPARSEVLM_KEEPS)]
    scored = scale_layers(SPARSEVLM_LAYERS, num_layers)
    layers = [l + 1 for l in scored]
    sol = solve(Shape.weighted(layers, [c / counts[0] for c in counts]), num_layers, num_visual, tier)
    stages = [Stage(l, k, score_layer=s) for l, k, s in zip(layers, sol.keeps, scored)]
    return RoutingConfig("prune", "text_attention", stages, scorer_options={"raters": True})


def _before_decoder(scorer: str, merge: str | None = None) -> Builder:
    def build(tier, num_layers, num_visual, family, opts=None) -> RoutingConfig:
        keep = int(math.floor(tier + 0.5))
        return RoutingConfig("prune", scorer, [Stage(0, keep, merge=merge)])
    return build


DART_LAYER = 2


def _dart(tier, num_layers, num_visual, family, opts=None) -> RoutingConfig:
    sol = solve(Shape.fastv(DART_LAYER), num_layers, num_visual, tier)
    return RoutingConfig("prune", "duplication", sol.stages, scorer_options={"pivot_visual": 4, "pivot_text": 4})


# ---- Nüwa --------------------------------------------------------------------------------------------------------
# LLaVA-1.5 (clip_encoder.py, modeling_llama.py): stage 2 at layer 16 of 32 scored at 15, keeping K1 / 7
# (112 -> 16, 224 -> 32, 336 -> 48), top-n = 1 / 2 / 3 (as many as the 144 regions must give).
# Qwen2.5-VL (qwen2_5vl_nuwa.py `prune_config`): target ratio -> (s1, s2, top-n); stage 2 after layer 14 of 28.
NUWA_QWEN = {0.25: (0.35, 0.42, 3), 0.5: (0.6, 0.66, 3), 0.75: (0.85, 0.7, 4)}
# The variant is the family's `nuwa_variant` (visroute.scoring.nuwa.family_variant). Nüwa's code covers LLaVA-1.5
# and Qwen2.5-VL only; Qwen2-VL and Qwen3-VL (a ViT with a patch merger, no [CLS]) take the Qwen variant by analogy,
# every other family (LLaVA-NeXT and OneVision: CLIP / SigLIP towers, merged in the decoder's input space) the LLaVA one.
REROUTE_NUWA_DECISIONS = 4  # stage 2's budget re-decided this many times over the second part of the decoder


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
        _, ratio2, top_n = NUWA_QWEN[_nearest(tier / num_visual, NUWA_QWEN)]
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


def _nuwa_stage1(plan: NuwaPlan, family: str | None) -> Stage:
    merge_options = {"variant": plan.variant} if family is not None else {}
    return Stage(0, plan.keep1, scorer="nuwa", scorer_options={"top_n": plan.top_n}, merge="nuwa",
                 merge_options=merge_options)


def _nuwa(tier, num_layers, num_visual, family, opts=None) -> RoutingConfig:
    plan = nuwa_plan(tier, num_layers, num_visual, family)
    return RoutingConfig("prune", "last_token_attention",
                         [_nuwa_stage1(plan, family), Stage(plan.layer2, plan.keep2, score_layer=plan.layer2 - 1)],
                         scorer_options=plan.stage2_options)


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
    stage1 = dataclasses.replace(_nuwa_stage1(plan, family), action="prune")
    return _reroute_config([stage1, *_nuwa_decisions(plan, num_layers, opts)], opts,
                           scorer_options=plan.stage2_options)


def _reroute_nuwa_layer0(tier, num_layers, num_visual, family, opts=None) -> RoutingConfig:
    plan = nuwa_plan(tier, num_layers, num_visual, family)
    return _reroute_config([_nuwa_stage1(plan, family), *_nuwa_decisions(plan, num_layers, opts)], opts,
                           scorer_options=plan.stage2_options)


# ---- the table ---------------------------------------------------------------------------------------------------
_METHODS = (
    Method("fastv", "FastV (Chen et al., 2024): K=3, prune; last-prompt-token attention, mean over heads, scored "
           "with layer 2's attention (K-1, as FastV does) and dropped before layer 3; one keep solved to the tier",
           _fastv),
    Method("pdrop", "PyramidDrop (Xing et al., 2025): prune at [2, 7, 15, 23] (scaled to the depth) with geometric "
           "keeps solved to the tier; last-token attention at each boundary layer itself", _pdrop),
    Method("sparsevlm", "SparseVLM (Zhang et al., 2025): layers 2, 6, 15 (scaled) rank by the attention of the "
           "instruction tokens (text_attention with raters, mean over heads) and the kept set runs from the next "
           "layer; keeps in the proportions of its released lists for the nearest tier ([300, 200, 110], "
           "[303, 110, 36], [66, 30, 17]), solved to the tier. Left out: token recycling (merging some dropped "
           "tokens back) and its rank-adaptive keep counts", _sparsevlm),
    Method("visionzip", "VisionZip (Yang et al., 2025): before the decoder, dominant tokens by the tower's [CLS] "
           "attention plus contextual tokens (54 + 10, 108 + 20, 162 + 30: a 10/64 share) into which the rest are "
           "merged by key similarity; [CLS] itself is not a visual token here, so all kept tokens are patches, "
           "each at its own position", _before_decoder("visionzip", merge="visionzip")),
    Method("dart", "DART (Wen et al., 2025): prune at layer 2, keeping the tokens least similar to 4 visual + 4 text "
           "pivots (key L1 norm), one keep solved to the tier (DART's own settings keep the tier's count after "
           "layer 2, a higher avg_T); keys from layer 2's own projection (DART reads layer 1's cached keys)",
           _dart),
    Method("divprune", "DivPrune (Alvar et al., 2025): before the decoder, greedy max-min cosine diversity over the "
           "projected visual tokens, keeping the tier's count", _before_decoder("diversity")),
    Method("nuwa", "Nüwa (released code): before the decoder, vision-tower [CLS] attention (Qwen: attention "
           "received) with the 2x2 regional rule and the region-cohesion merge; then last-prompt-token attention "
           "scored one layer before stage 2 acts (LLaVA-1.5: layer 15 for 16, mean over heads, K2 = K1/7: 112 + 16, "
           "224 + 32, 336 + 48 give avg_T 64 / 128 / 192 exactly; Qwen2.5-VL: layer 14 for 15, the last 3 text "
           "tokens, max over heads, its released ratios solved to the tier); the budget split per image", _nuwa),
    Method("reroute-fastv", "Reroute matched to FastV (the reference's ours_vs_fastv): FastV's keep re-selected at "
           "[3, 7, 15, 23] (scaled) over all visual tokens; the first decision scored as FastV scores it (layer 2 "
           "for 3), the re-selections at their own layer as the reference code does (scoring=previous: at l-1)",
           _reroute_fastv, base="fastv", Options=RerouteOptions),
    Method("reroute-pdrop", "Reroute matched to PyramidDrop (the reference's ours_vs_pdrop): keeps [a, a, a/2, a/4] at "
           "[2, 7, 15, 23] (scaled), reroute, solved to exactly PyramidDrop's avg_T; every decision scored at its "
           "own layer (scoring=previous: re-selections at l-1). Its schedule differs from PyramidDrop's geometric "
           "one, so compare it with prune on the same schedule too (the study's 2 x 2)", _reroute_pdrop,
           base="pdrop", Options=RerouteOptions),
    Method("reroute-nuwa", "Reroute matched to Nüwa (the Reroute reference code has no Nüwa variant; this is the "
           "closest reading of 'Nüwa + Reroute'): Nüwa's stage 1 as released (regional [CLS] selection and merge "
           "before the decoder, a prune), then stage 2's budget K2 re-decided at 4 layers (LLaVA-1.5: 16, 20, 24, "
           "28) among the K1 survivors, rerouted; the first decision scored as Nüwa scores stage 2 (one layer "
           "before), the others at their own layer (scoring=previous: at l-1). Nüwa's per-layer counts and avg_T",
           _reroute_nuwa, base="nuwa", Options=RerouteOptions),
    Method("reroute-nuwa-layer0", "Reroute matched to Nüwa, routing from layer 0 (visroute's earlier design): stage "
           "1 is a routing stage too (kept tokens enter merged; the others are carried with their own unmerged "
           "embedding and may re-enter at any later decision), and stage 2's K2 is re-decided at 4 layers over all "
           "visual tokens, scored as reroute-nuwa's: Nüwa's per-layer counts and avg_T", _reroute_nuwa_layer0,
           base="nuwa", Options=RerouteOptions),
)
METHODS: dict[str, Method] = {m.name: m for m in _METHODS}
from visroute.frontier_methods import FRONTIER_METHODS  # noqa: E402 (VisPruner, CDPruner, HoloV, SCOPE)

METHODS.update({name: Method(name, description, build) for name, description, build in FRONTIER_METHODS})


def methods() -> dict[str, Method]:
    """Every named method, in listing order."""
    return dict(METHODS)


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"Unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


def parse_method_spec(spec: str) -> tuple[str, float, dict[str, Any]]:
    """"reroute-fastv@64:scoring=previous" -> ("reroute-fastv", 64, {"scoring": "previous"}): NAME@TIER, then
    the method's options as `:key=value` parts (values read as YAML), checked against the method."""
    import yaml

    head, *parts = str(spec).split(":")
    name, tier = parse_method(head)
    options: dict[str, Any] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(f"Bad option {part!r} in {spec!r}: expected NAME@TIER:key=value, e.g. "
                             "reroute-fastv@72:scoring=previous")
        options[key] = yaml.safe_load(value)
    get_method(name).build_options(options)
    return name, tier, options


def parse_method(spec: str) -> tuple[str, float]:
    """"nuwa@64" -> ("nuwa", 64); the tier is an avg_T (64, 128, 192 are the papers' tiers; any positive
    number is taken). Options after the tier (`:key=value`) are checked and left out (`parse_method_spec`)."""
    if ":" in str(spec):
        name, tier, _ = parse_method_spec(spec)
        return name, tier
    name, sep, tier = str(spec).partition("@")
    if not sep or not tier:
        raise ValueError(f"Bad method {spec!r}: expected NAME@TIER, e.g. nuwa@64 (methods: {', '.join(METHODS)})")
    get_method(name)
    try:
        value = float(tier)
    except ValueError:
        raise ValueError(f"Bad tier in {spec!r}: expected an avg_T such as 64, 128 or 192") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"Bad tier in {spec!r}: an avg_T must be positive")
    return name, int(value) if value.is_integer() else value


def method_config(spec: str, num_layers: int, num_visual: int, family: str | None = None) -> RoutingConfig:
    """The RoutingConfig of `spec` ("NAME@TIER", options as `:key=value`) for a decoder of `num_layers` layers and an image of `num_visual`
    visual tokens; `family` (a model family's registry name, e.g. "llava", "qwen2_5_vl") picks a family's own
    released variant where a method has one (Nüwa), None the LLaVA-1.5 one."""
    name, tier, options = parse_method_spec(spec)
    return get_method(name).config(tier, num_layers, num_visual, family, **options)


def method_preset(name: str, tier: float, model: str = "llava-1.5", num_visual: int | None = None,
                  num_layers: int | None = None) -> RoutingConfig:
    """A method at a tier for a bench shape or alias (`visroute.families.shapes()`: "llava-1.5-7b",
    "qwen2.5-vl-7b", ...); Qwen shapes need `num_visual` (it depends on the image)."""
    from visroute.budget import model_budget
    from visroute.families import get_shape

    layers, visual = model_budget(model, num_layers, num_visual)
    return get_method(name).config(tier, layers, visual, get_shape(model).family)


def listing(num_layers: int = 32, num_visual: int = 576, family: str | None = None,
            tiers: tuple[float, ...] = TIERS) -> list[dict]:
    """One row per method and tier: name, tier, description, the config and its avg_T (or the error when the
    tier is out of reach)."""
    rows = []
    for m in METHODS.values():
        for tier in tiers:
            row = {"method": m.name, "tier": tier, "description": m.description, "base": m.base,
                   "options": m.option_specs()}
            try:
                cfg = m.config(tier, num_layers, num_visual, family)
                row.update(config=cfg, avg_T=schedule_avg_T(cfg, num_layers, num_visual))
            except ValueError as e:
                row.update(config=None, avg_T=None, error=str(e))
            rows.append(row)
    return rows


__all__ = ["METHODS", "Method", "NuwaPlan", "RerouteOptions", "get_method", "listing", "method_config",
           "method_preset", "methods", "nuwa_plan", "parse_method", "parse_method_spec", "reroute_nuwa_layers"]
