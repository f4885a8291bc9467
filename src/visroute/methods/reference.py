"""The Reroute reference code's configs (github.com/elmma/mllm-reroute, configs/experiment/) as methods of their own:
`ref-fastv`, `ref-pdrop`, `ref-reroute-fastv`, `ref-reroute-pdrop` (`visroute.budget.PRESETS`: its layer lists and
keep shapes, every decision scored at its own layer with `last_token_attention`), solved to the tier with integer
keeps. They differ from `fastv`, `pdrop`, ... which follow each paper's own convention (FastV scored at K-1);
`visroute bench --preset NAME@TIER` runs `ref-NAME@TIER`. Option `scorer`: the scorer of every stage."""

from __future__ import annotations

from dataclasses import dataclass

from visroute.budget import DEFAULT_SCORER, PRESETS, preset_solution
from visroute.config import RoutingConfig
from visroute.methods import Method, register_method
from visroute.options import option

PREFIX = "ref-"


@dataclass(frozen=True)
class ReferenceOptions:
    scorer: str = option(DEFAULT_SCORER, "the scorer of every stage (the reference code: last-token attention)")

    def __post_init__(self):
        from visroute.scoring import get_scorer_class

        get_scorer_class(self.scorer)  # an unknown scorer names the registered ones


def _build(name: str):
    def build(tier, num_layers, num_visual, family, opts=None) -> RoutingConfig:
        sol, action = preset_solution(name, tier, num_visual=num_visual, num_layers=num_layers)
        return sol.config(action, opts.scorer if opts is not None else DEFAULT_SCORER)
    return build


for _name, _description in PRESETS.items():
    register_method(Method(f"{PREFIX}{_name}", f"Reroute reference config: {_description}", _build(_name),
                           Options=ReferenceOptions))
