"""Token budgets: schedule builders, the avg_T a schedule implies, a solver that hits a target avg_T with
integer keeps, presets for the papers' configs at the 192 / 128 / 64 tiers, and matched configs.

avg_T (docs/DESIGN.md) is the mean over all decoder layers of the visual tokens active in that layer; layers before
the first stage hold all of them. Integer keeps make a preset exact for one visual-token count: a fraction is
floored per sample, so the same fraction lands on a different avg_T for every count and layer depth.

    from visroute.budget import Shape, solve, preset
    sol = solve(Shape.pdrop([2, 7, 15, 23]), num_layers=32, num_visual=576, target=128)
    sol.keeps, sol.avg_T          # integer keeps, and the avg_T they achieve
    cfg = preset("pdrop", 128)    # a RoutingConfig for LLaVA-1.5
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from visroute.config import ACTIONS, RoutingConfig, Stage, check_increasing
from visroute.names import PRESETS, TIERS  # noqa: F401  (their home is torch-free, for the command line's help)
DEFAULT_SCORER = "last_token_attention"


# ---- avg_T of a schedule --------------------------------------------------------------------------------------
def _stages_of(schedule: RoutingConfig | Sequence[Stage]) -> list[Stage]:
    return list(schedule.stages) if isinstance(schedule, RoutingConfig) else list(schedule)


def active_per_layer(
    schedule: RoutingConfig | Sequence[Stage], num_layers: int, num_visual: int, action: str | None = None
) -> list[int]:
    """Visual tokens active in each decoder layer for a sample with `num_visual` visual tokens, as the engine
    runs it: a prune stage can keep at most what the previous stage kept; a reroute stage at most what no prune
    stage removed. `action` overrides the config's (stages naming their own action keep it)."""
    stages = _stages_of(schedule)
    if action is None:
        action = schedule.action if isinstance(schedule, RoutingConfig) else "prune"
    if action not in ACTIONS:
        raise ValueError(f"Unknown action {action!r}; choose one of {', '.join(ACTIONS)}")
    _check_layers([s.layer for s in stages], num_layers)
    at = {s.layer: s for s in stages}
    active, alive, out = num_visual, num_visual, []
    for layer in range(num_layers):
        if layer in at:
            stage_action = at[layer].action or action
            cap = active if stage_action == "prune" else alive
            active = min(at[layer].keep_count(num_visual), cap)
            if stage_action == "prune":
                alive = active
        out.append(active)
    return out


def schedule_avg_T(
    schedule: RoutingConfig | Sequence[Stage], num_layers: int, num_visual: int, action: str | None = None
) -> float:
    """avg_T of a schedule for a sample with `num_visual` visual tokens on a `num_layers`-layer decoder."""
    return sum(active_per_layer(schedule, num_layers, num_visual, action)) / num_layers


def _check_layers(layers: Sequence[int], num_layers: int) -> None:
    if num_layers <= 0:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    check_increasing(layers)
    bad = [l for l in layers if not 0 <= l < num_layers]
    if bad:
        raise ValueError(f"Stage layers {bad} lie outside the decoder's layers 0..{num_layers - 1}")


# ---- shapes and the solver ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """A family of schedules with one free parameter p.

    kind "weights":   keep_s = min(p * weights_s, 1) * num_visual (FastV: one stage; reroute-vs-PDrop: [1, 1, .5, .25]);
                      a stage whose keep reaches all visual tokens stays there while the others grow
    kind "geometric": keep_s = p**(s+1) * num_visual (PyramidDrop)
    """

    layers: tuple[int, ...]
    kind: str = "weights"
    weights: tuple[float, ...] = ()
    name: str = ""

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("A shape needs at least one stage layer")
        if self.kind not in ("weights", "geometric"):
            raise ValueError(f"Unknown shape kind {self.kind!r}; use 'weights' or 'geometric'")
        if self.kind == "weights":
            if len(self.weights) != len(self.layers):
                raise ValueError(f"{len(self.layers)} layers need as many weights, got {len(self.weights)}")
            if any(w < 0 for w in self.weights) or max(self.weights) <= 0:
                raise ValueError(f"Shape weights must be >= 0 with one positive, got {list(self.weights)}")

    @classmethod
    def fastv(cls, layer: int = 3) -> "Shape":
        return cls((int(layer),), "weights", (1.0,), "fastv")

    @classmethod
    def pdrop(cls, layers: Sequence[int]) -> "Shape":
        return cls(tuple(int(l) for l in layers), "geometric", (), "pdrop")

    @classmethod
    def uniform(cls, layers: Sequence[int]) -> "Shape":
        return cls(tuple(int(l) for l in layers), "weights", (1.0,) * len(layers), "uniform")

    @classmethod
    def weighted(cls, layers: Sequence[int], weights: Sequence[float]) -> "Shape":
        return cls(tuple(int(l) for l in layers), "weights", tuple(float(w) for w in weights), "weighted")

    @property
    def param_max(self) -> float:
        return 1.0 if self.kind == "geometric" else 1.0 / min(w for w in self.weights if w > 0)

    def keeps(self, p: float, num_visual: int) -> list[float]:
        """Continuous keeps (token counts) at parameter p."""
        if self.kind == "geometric":
            return [num_visual * p ** (i + 1) for i in range(len(self.layers))]
        return [min(num_visual, p * w * num_visual) for w in self.weights]

    @property
    def non_increasing(self) -> bool:
        return self.kind == "geometric" or all(b <= a for a, b in zip(self.weights, self.weights[1:]))


@dataclass
class Solution:
    """Integer keeps for a shape, and the avg_T they achieve (`avg_T`) against the `target`."""

    shape: Shape
    num_layers: int
    num_visual: int
    target: float
    keeps: list[int]
    avg_T: float
    param: float

    @property
    def stages(self) -> list[Stage]:
        return [Stage(layer=l, keep=k) for l, k in zip(self.shape.layers, self.keeps)]

    @property
    def error(self) -> float:
        return self.avg_T - self.target

    def config(self, action: str = "prune", scorer: str = DEFAULT_SCORER, **scorer_options) -> RoutingConfig:
        return RoutingConfig(action=action, scorer=scorer, stages=self.stages, scorer_options=scorer_options)


def avg_T_range(shape: Shape, num_layers: int, num_visual: int) -> tuple[float, float]:
    """The smallest and largest avg_T a schedule with these stage layers can reach."""
    first = shape.layers[0]
    return first * num_visual / num_layers, float(num_visual)


def solve(shape: Shape, num_layers: int, num_visual: int, target: float, radius: int = 3) -> Solution:
    """Integer keeps of `shape` whose avg_T is the closest possible to `target`.

    The shape's parameter is solved continuously first; then every combination of integer keeps within
    `radius` of the continuous keeps (non-increasing when the shape is, so that prune and reroute run the same
    counts) is searched by dynamic programming over the stages for the one closest to the target, ties broken by
    the distance to the continuous keeps."""
    _check_layers(shape.layers, num_layers)
    if num_visual <= 0:
        raise ValueError(f"num_visual must be positive, got {num_visual}")
    lo, hi = avg_T_range(shape, num_layers, num_visual)
    if not lo - 1e-9 <= target <= hi + 1e-9:
        raise ValueError(
            f"Target avg_T {target} is out of reach: with the first stage at layer {shape.layers[0]} of "
            f"{num_layers} and {num_visual} visual tokens, avg_T lies in [{lo:.2f}, {hi:.2f}]"
        )
    spans = [b - a for a, b in zip(shape.layers, [*shape.layers[1:], num_layers])]
    before = shape.layers[0] * num_visual

    def continuous_avg(p: float) -> float:
        return (before + sum(s * k for s, k in zip(spans, shape.keeps(p, num_visual)))) / num_layers

    reach = continuous_avg(shape.param_max)
    if target > reach + 0.5:
        raise ValueError(f"Target avg_T {target} is out of reach of this shape: at most {reach:.2f} with "
                         f"{num_visual} visual tokens on {num_layers} layers")

    a, b = 0.0, shape.param_max
    for _ in range(200):  # avg_T grows with p: bisection
        mid = (a + b) / 2
        a, b = (mid, b) if continuous_avg(mid) < target else (a, mid)
    p = (a + b) / 2
    x = shape.keeps(p, num_visual)

    goal = target * num_layers - before  # sum over stages of span * keep
    # states: (sum, last keep) -> (squared distance to x, keeps)
    states: dict[tuple[int, int], tuple[float, tuple[int, ...]]] = {(0, num_visual): (0.0, ())}
    for span, xs in zip(spans, x):
        cands = range(max(0, math.floor(xs) - radius), min(num_visual, math.ceil(xs) + radius) + 1)
        nxt: dict[tuple[int, int], tuple[float, tuple[int, ...]]] = {}
        for (total, last), (cost, keeps) in states.items():
            for k in cands:
                if shape.non_increasing and k > last:
                    continue
                key = (total + span * k, k if shape.non_increasing else num_visual)
                c = cost + (k - xs) ** 2
                if key not in nxt or c < nxt[key][0]:
                    nxt[key] = (c, keeps + (k,))
        states = nxt
    if not states:
        raise ValueError("No integer keeps fit this shape; widen `radius`")
    (total, _), (cost, keeps) = min(states.items(), key=lambda kv: (round(abs(kv[0][0] - goal), 9), kv[1][0]))
    return Solution(shape=shape, num_layers=num_layers, num_visual=num_visual, target=float(target),
                    keeps=list(keeps), avg_T=(before + total) / num_layers, param=p)


def single_stage_keep(layer: int, num_layers: int, num_visual: int, target: float) -> int:
    """The integer keep of one stage at `layer` whose avg_T is the closest possible to `target` (a count of
    visual tokens): the where-to-prune sweep at matched compute, where a later stage keeps fewer tokens. With
    ell = `layer`, L layers and N visual tokens, avg_T = (ell N + (L - ell) keep) / L, so keep = (L target -
    ell N) / (L - ell), rounded to the nearest integer; a target below ell N / L (the stage would
    need a negative keep) is out of reach and an error."""
    return solve(Shape.fastv(layer), num_layers, num_visual, target).keeps[0]


def reachable_layers(num_layers: int, num_visual: int, target: float) -> list[int]:
    """The decoder layers at which one stage can reach avg_T `target` (tokens): those with layer * num_visual
    / num_layers <= target <= num_visual."""
    if not 0 <= target <= num_visual:
        return []
    return [l for l in range(num_layers) if l * num_visual <= target * num_layers + 1e-9]


# ---- matched configs ------------------------------------------------------------------------------------------
def matched(
    config: RoutingConfig,
    num_layers: int,
    num_visual: int,
    action: str = "reroute",
    reselect_at: Sequence[int] = (),
    shape: Shape | None = None,
    scorer: str | None = None,
) -> RoutingConfig:
    """A config with the same avg_T as `config` (for a sample with `num_visual` visual tokens).

    Without `shape`: the same per-layer active counts as `config`, as integer keeps, with `action`; `reselect_at`
    adds stages that re-select with the budget already in force (e.g. Reroute-vs-FastV re-selects at
    [7, 15, 23] with FastV's keep). With `shape`: the shape solved for `config`'s avg_T (closest possible)."""
    target = schedule_avg_T(config, num_layers, num_visual)
    scorer = scorer or config.scorer
    opts = dict(config.scorer_options)
    if shape is not None:
        sol = solve(shape, num_layers, num_visual, target)
        return sol.config(action, scorer, **opts)
    active = active_per_layer(config, num_layers, num_visual)
    layers = sorted({s.layer for s in config.stages} | {int(l) for l in reselect_at})
    _check_layers(layers, num_layers)
    first = config.stages[0].layer if config.stages else num_layers
    if any(l < first for l in layers):
        raise ValueError(f"Re-selection layers {list(reselect_at)} must not precede the first stage (layer {first})")
    stages = [Stage(layer=l, keep=int(active[l])) for l in layers]
    if action == "prune" and any(b.keep > a.keep for a, b in zip(stages, stages[1:])):
        raise ValueError(
            "This schedule grows the active set at a later stage, which pruning cannot do; pass shape= to solve a "
            "prune schedule with the same avg_T"
        )
    out = RoutingConfig(action=action, scorer=scorer, stages=stages, scorer_options=opts)
    assert sum(active_per_layer(out, num_layers, num_visual)) == sum(active)
    return out


# ---- presets --------------------------------------------------------------------------------------------------
# The papers' stage layers on a 32-layer decoder (LLaVA-1.5-7B). FastV's K=3 is a fixed depth; the other
# layers are scaled to other depths (round(l * L / 32), which gives the Reroute code's Qwen layers).
FASTV_LAYER = 3
PDROP_LAYERS = (2, 7, 15, 23)
REROUTE_FASTV_RESELECT = (7, 15, 23)
REROUTE_PDROP_WEIGHTS = (1.0, 1.0, 0.5, 0.25)

# PRESETS (visroute.names): the four configs below, by name.


def scale_layers(layers: Sequence[int], num_layers: int, reference_layers: int = 32) -> list[int]:
    return [int(math.floor(l * num_layers / reference_layers + 0.5)) for l in layers]


def model_budget(model: str, num_layers: int | None = None, num_visual: int | None = None) -> tuple[int, int]:
    """(decoder layers, visual tokens per sample) for a preset: `model` names a bench shape or one of its aliases
    ("llava-1.5", "qwen2.5-vl-7b", ...; `visroute.families.shapes()`), whose family says how many visual tokens
    an image gives; `num_layers` / `num_visual` override them (any model, given both)."""
    from visroute.families import families, get_shape

    if num_layers is not None and num_visual is not None:
        return num_layers, num_visual
    shape = get_shape(model)
    family = families()[shape.family]
    visual = num_visual or family.visual_tokens(family.build_config(shape))
    if visual is None:
        raise ValueError(
            f"{model}'s visual token count depends on the image; pass num_visual= (e.g. "
            f"visroute.families.families()[{shape.family!r}].visual_tokens(config, height, width))"
        )
    return num_layers or shape.num_layers, visual


def preset_solution(name: str, tier: int | float, model: str = "llava-1.5", num_visual: int | None = None,
                    num_layers: int | None = None) -> tuple[Solution, str]:
    """The solved schedule of a preset and its action. Any avg_T is accepted here; `preset` checks tiers."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    layers, visual = model_budget(model, num_layers, num_visual)
    pd_layers = scale_layers(PDROP_LAYERS, layers)
    if name in ("fastv", "reroute-fastv"):
        sol = solve(Shape.fastv(FASTV_LAYER), layers, visual, tier)
        if name == "reroute-fastv":
            reselect = [l for l in scale_layers(REROUTE_FASTV_RESELECT, layers) if l > FASTV_LAYER]
            shape = Shape.uniform([FASTV_LAYER, *reselect])
            sol = Solution(shape, layers, visual, sol.target, [sol.keeps[0]] * len(shape.layers), sol.avg_T, sol.param)
        return sol, "prune" if name == "fastv" else "reroute"
    if name == "pdrop":
        return solve(Shape.pdrop(pd_layers), layers, visual, tier), "prune"
    return solve(Shape.weighted(pd_layers, REROUTE_PDROP_WEIGHTS), layers, visual, tier), "reroute"


def tiers_of(model: str) -> tuple[int, ...]:
    """The avg_T tiers presets come at for `model` (a shape name or alias; any other model: `TIERS`)."""
    from visroute.families import get_shape

    try:
        return get_shape(model).tiers
    except ValueError:
        return TIERS


def preset(name: str, tier: int, model: str = "llava-1.5", num_visual: int | None = None,
           num_layers: int | None = None, scorer: str = DEFAULT_SCORER, **scorer_options) -> RoutingConfig:
    """A named preset at one of `model`'s tiers (192 / 128 / 64 for LLaVA-1.5 and Qwen2.5-VL) for `model`
    ("llava-1.5", "qwen2.5-vl-7b", "qwen2.5-vl-3b", any bench shape, or any model given `num_layers` and
    `num_visual`). Keeps are integer counts for `num_visual` visual tokens, solved to the tier's avg_T."""
    tiers = tiers_of(model)
    if tier not in tiers:
        raise ValueError(f"Unknown tier {tier!r}; presets for {model} come at avg_T {', '.join(map(str, tiers))}")
    sol, action = preset_solution(name, tier, model, num_visual, num_layers)
    return sol.config(action, scorer, **scorer_options)


def parse_preset(spec: str, tiers: tuple[int, ...] = TIERS) -> tuple[str, int]:
    """"pdrop@128" -> ("pdrop", 128); the tier must be one of `tiers`."""
    name, _, tier = spec.partition("@")
    if not tier:
        raise ValueError(f"Bad preset {spec!r}: expected name@tier, e.g. pdrop@128")
    try:
        t = int(tier)
    except ValueError:
        raise ValueError(f"Bad tier in {spec!r}: expected one of {', '.join(map(str, tiers))}") from None
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    if t not in tiers:
        raise ValueError(f"Unknown tier {t} in {spec!r}; presets come at avg_T {', '.join(map(str, tiers))}")
    return name, t
