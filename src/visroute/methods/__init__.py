"""Named methods: a published token-reduction method (or its Reroute variant, or a reference code's config) at an
avg_T tier, solved into a `RoutingConfig` for one model's number of decoder layers and one image's number of
visual tokens.

    from visroute.methods import method_config, method_preset, methods
    cfg = method_config("nuwa@64", num_layers=32, num_visual=576)                 # LLaVA-1.5-7B
    cfg = method_config("pdrop@128", 28, 391, family="qwen2_5_vl")                 # Qwen2.5-VL-7B, a 640x480 image
    cfg = method_preset("reroute-nuwa", 64, "llava-1.5-7b")                        # by bench shape name
    cfg = method_config("reroute-fastv@128:scoring=previous:reentry=hysteresis", 32, 576)   # with options
    for name, m in methods().items(): print(name, m.description)

One module per method (`visroute.methods.fastv`, `.nuwa`, `.cdpruner`, ...) holds its plan and tables and
registers it with `register_method`; the signals they use stay in `visroute.scoring`. Third-party packages
register theirs through the entry-point group `visroute.methods` (the entry point names a `Method` or a module
that registers its methods when imported); a name another method holds is an error. `parse_method_spec` is the
one NAME@TIER[:key=value...] parser (CLI, grids, bench, the lmms-eval plug-in).

Every config is solved with integer keeps (`visroute.budget.solve`) so that its avg_T (the mean over decoder
layers of the visual tokens active in each layer) is the closest possible to the tier, and each Reroute variant
runs at exactly the avg_T of its base method. Stage layers are the papers' on a 32-layer decoder, scaled to other
depths by round(l x L / 32) (FastV's K = 3 is a fixed depth), except where a family has its own released
schedule (Nüwa on Qwen2.5-VL). The `ref-*` methods are the Reroute reference code's configs (`visroute.budget`,
scores taken at the decision layer itself); the others follow each paper's own convention, said in each
description.

The Reroute variants take options (`NAME@TIER:key=value:...`): `scoring` says where a re-selection takes its
scores: "decision" (default: the decision layer's own attention, as the Reroute reference code,
elmma/mllm-reroute `models/router.py`, scores every decision) or "previous" (layer l-1, FastV's K-1 convention
carried over); the first decision is always scored as the base method scores it. `reentry` names the re-entry
policy of the reroute stages (`visroute.reentry`; default "reference", the plain top keep).
"""

from __future__ import annotations

import importlib.metadata
import math
from dataclasses import dataclass
from typing import Any, Callable

from visroute.budget import TIERS, schedule_avg_T
from visroute.config import RoutingConfig, Stage
from visroute.options import HasOptions, NoOptions

ENTRY_POINT_GROUP = "visroute.methods"
Builder = Callable[[float, int, int, "str | None", Any], RoutingConfig]


@dataclass(frozen=True)
class Method:
    """A named method. `config(tier, num_layers, num_visual, family, **options)` solves it; `base` is the method a
    Reroute variant is matched to (same avg_T), None for the others; `Options` its typed options."""

    name: str
    description: str
    build: Builder
    base: str | None = None
    Options: type = NoOptions

    def _holder(self) -> type:
        return type("MethodOptions", (HasOptions,), {"name": self.name, "kind": "method", "Options": self.Options})

    def build_options(self, options: dict[str, Any] | None = None) -> Any:
        """The typed options from a plain dict; unknown names, wrong types and values are errors naming them."""
        return self._holder().build_options(options)

    def option_specs(self):
        return self._holder().option_specs()

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


# ---- the registry ----------------------------------------------------------------------------------------------
METHODS: dict[str, Method] = {}  # in registration order (the built-ins first, in listing order)
_loaded = {"entry_points": False}


def register_method(method: Method) -> Method:
    """Register a method under its name. A name another method holds is an error (registering the same method
    again is not)."""
    if not isinstance(method, Method):
        raise TypeError(f"register_method takes a visroute.methods.Method, not {method!r}")
    if not method.name or "@" in method.name or ":" in method.name:
        raise ValueError(f"Bad method name {method.name!r}: it must be non-empty, without '@' or ':'")
    held = METHODS.get(method.name)
    if held is not None and held is not method:
        raise ValueError(f"A method named {method.name!r} is already registered ({held.description[:60]}...)")
    method.option_specs()  # an Options class that is not a dataclass fails here, at registration
    METHODS[method.name] = method
    return method


def _load_entry_points() -> None:
    if _loaded["entry_points"]:
        return
    _loaded["entry_points"] = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = ep.load()
        except Exception as e:  # a broken plug-in says which one it is
            raise ImportError(f"The method entry point {ep.name!r} ({ep.value}) failed to load: {e}") from e
        if isinstance(loaded, Method):
            register_method(loaded)


def methods() -> dict[str, Method]:
    """Every named method, in listing order (built-ins, then third-party ones)."""
    _load_entry_points()
    return dict(METHODS)


def get_method(name: str) -> Method:
    _load_entry_points()
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"Unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


# ---- shared builders ---------------------------------------------------------------------------------------------
def layer0(scorer: str, merge: str | None = None, **scorer_options: Any) -> Builder:
    """One prune stage at layer 0 keeping the tier's count (the tier rounded): the method acts before the decoder
    and avg_T is the tier exactly."""
    def build(tier, num_layers, num_visual, family, opts=None) -> RoutingConfig:
        keep = int(math.floor(tier + 0.5))
        return RoutingConfig("prune", scorer, [Stage(0, keep, merge=merge)], scorer_options=dict(scorer_options))
    return build


def nearest(tier: float, table) -> int:
    """The key of `table` nearest to `tier` (ties to the smaller)."""
    return min(table, key=lambda t: (abs(t - tier), t))


# ---- NAME@TIER ---------------------------------------------------------------------------------------------------
def parse_method_spec(spec: str) -> tuple[str, float, dict[str, Any]]:
    """"reroute-fastv@64:scoring=previous" -> ("reroute-fastv", 64, {"scoring": "previous"}): NAME@TIER, then
    the method's options as `:key=value` parts (values read as YAML), checked against the method. The one parser
    of method specs."""
    import yaml

    head, *parts = str(spec).split(":")
    name, sep, tier = head.partition("@")
    if not sep or not tier:
        raise ValueError(f"Bad method {spec!r}: expected NAME@TIER, e.g. nuwa@64 (methods: {', '.join(methods())})")
    method = get_method(name)
    try:
        value = float(tier)
    except ValueError:
        raise ValueError(f"Bad tier in {spec!r}: expected an avg_T such as 64, 128 or 192") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"Bad tier in {spec!r}: an avg_T must be positive")
    options: dict[str, Any] = {}
    for part in parts:
        key, sep, text = part.partition("=")
        if not sep or not key:
            raise ValueError(f"Bad option {part!r} in {spec!r}: expected NAME@TIER:key=value, e.g. "
                             "reroute-fastv@72:scoring=previous")
        options[key] = yaml.safe_load(text)
    method.build_options(options)
    return name, int(value) if value.is_integer() else value, options


def parse_method(spec: str) -> tuple[str, float]:
    """"nuwa@64" -> ("nuwa", 64); the tier is an avg_T (64, 128, 192 are the papers' tiers; any positive
    number is taken). Options after the tier (`:key=value`) are checked and left out (`parse_method_spec`)."""
    name, tier, _ = parse_method_spec(spec)
    return name, tier


def method_config(spec: str, num_layers: int, num_visual: int, family: str | None = None) -> RoutingConfig:
    """The RoutingConfig of `spec` ("NAME@TIER", options as `:key=value`) for a decoder of `num_layers` layers and
    an image of `num_visual` visual tokens; `family` (a model family's registry name, e.g. "llava", "qwen2_5_vl")
    picks a family's own released variant where a method has one (Nüwa), None the LLaVA-1.5 one."""
    name, tier, options = parse_method_spec(spec)
    return get_method(name).config(tier, num_layers, num_visual, family, **options)


def method_preset(name: str, tier: float, model: str = "llava-1.5", num_visual: int | None = None,
                  num_layers: int | None = None, **options: Any) -> RoutingConfig:
    """A method at a tier for a bench shape or alias (`visroute.families.shapes()`: "llava-1.5-7b",
    "qwen2.5-vl-7b", ...); Qwen shapes need `num_visual` (it depends on the image)."""
    from visroute.budget import model_budget
    from visroute.families import get_shape

    layers, visual = model_budget(model, num_layers, num_visual)
    return get_method(name).config(tier, layers, visual, get_shape(model).family, **options)


def listing(num_layers: int = 32, num_visual: int = 576, family: str | None = None,
            tiers: tuple[float, ...] = TIERS) -> list[dict]:
    """One row per method and tier: name, tier, description, the config and its avg_T (or the error when the
    tier is out of reach)."""
    rows = []
    for m in methods().values():
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


# The built-in methods, in listing order (importing a module registers its methods).
from visroute.methods import fastv as _fastv  # noqa: E402,F401
from visroute.methods import pdrop as _pdrop  # noqa: E402,F401
from visroute.methods import sparsevlm as _sparsevlm  # noqa: E402,F401
from visroute.methods import visionzip as _visionzip  # noqa: E402,F401
from visroute.methods import dart as _dart  # noqa: E402,F401
from visroute.methods import divprune as _divprune  # noqa: E402,F401
from visroute.methods import nuwa as _nuwa  # noqa: E402,F401
from visroute.methods import reroute as _reroute  # noqa: E402,F401
from visroute.methods import vispruner as _vispruner  # noqa: E402,F401
from visroute.methods import cdpruner as _cdpruner  # noqa: E402,F401
from visroute.methods import holov as _holov  # noqa: E402,F401
from visroute.methods import scope as _scope  # noqa: E402,F401
from visroute.methods import reference as _reference  # noqa: E402,F401
from visroute.methods.nuwa import NuwaPlan, nuwa_plan  # noqa: E402
from visroute.methods.reroute import RerouteOptions, reroute_nuwa_layers  # noqa: E402

__all__ = ["ENTRY_POINT_GROUP", "METHODS", "Method", "NuwaPlan", "RerouteOptions", "get_method", "layer0", "listing",
           "method_config", "method_preset", "methods", "nuwa_plan", "parse_method", "parse_method_spec",
           "register_method", "reroute_nuwa_layers"]
