"""The Reroute report section (visroute.evaluation.reroute_study): which cells compute the same by definition,
the 2 x 2 contrasts against hand-computed differences, and the per-decision statistics against hand counts; and
the grid's action override."""

from __future__ import annotations

import numpy as np
import pytest

from visroute.config import RoutingConfig, Stage
from visroute.evaluation import parse_grid
from visroute.evaluation.report import RunSummary
from visroute.evaluation.reroute_study import contrasts_of, decision_stats, designs, reroutes_as_it_prunes, section
from visroute.evaluation.store import Row, Run
from visroute.methods import method_config


def summary(name, cfg, correct, decisions=None):
    run = Run(1, name, "routed", "testbed", "h", {}, cfg.to_dict() if cfg is not None else None, "c", "testbed")
    rows = {}
    for i, c in enumerate(correct):
        routing = {"decisions": decisions[i]} if decisions else None
        rows[f"i{i}"] = Row(f"i{i}", "x", bool(c), {"family": "grounding" if i % 2 else "attribute"},
                            routing=routing)
    return RunSummary(run, rows, float(np.mean(correct)), (0.0, 1.0))


def test_which_schedules_reroute_exactly_as_they_prune():
    assert reroutes_as_it_prunes(RoutingConfig("reroute", "random", [Stage(3, 20)]))  # one stage
    assert not reroutes_as_it_prunes(RoutingConfig("reroute", "random", [Stage(3, 20), Stage(6, 20)]))
    first, second = method_config("nuwa@36", 12, 144).stages
    from dataclasses import replace

    # Nüwa's stage 2 rerouted among the stage-1 survivors: nothing bypassed is left to choose
    assert reroutes_as_it_prunes(RoutingConfig("reroute", "last_token_attention",
                                               [replace(first, action="prune"), second]))
    assert not reroutes_as_it_prunes(RoutingConfig("reroute", "last_token_attention", [first, second]))
    assert not reroutes_as_it_prunes(method_config("reroute-nuwa@36", 12, 144))
    assert not reroutes_as_it_prunes(RoutingConfig("reroute", "random", [Stage(3, 20)], reentry="cumulative"))


def test_the_2x2_contrasts_equal_hand_differences_and_skip_what_is_identical_by_definition():
    # PDrop: four distinct cells; FastV: its flat Reroute schedule pruned is FastV itself
    L, N = 12, 144
    runs = [
        summary("pdrop@24", method_config("pdrop@24", L, N), [1, 1, 0, 1, 0, 1, 1, 0]),
        summary("pdrop@24/reroute", RoutingConfig.from_dict({**method_config("pdrop@24", L, N).to_dict(),
                                                             "action": "reroute"}), [1, 0, 0, 1, 0, 1, 1, 0]),
        summary("reroute-pdrop@24", method_config("reroute-pdrop@24", L, N), [1, 1, 1, 1, 0, 0, 1, 1]),
        summary("reroute-pdrop@24/prune", RoutingConfig.from_dict({**method_config("reroute-pdrop@24", L, N).to_dict(),
                                                                   "action": "prune"}), [1, 1, 1, 1, 1, 1, 1, 1]),
        summary("fastv@72", method_config("fastv@72", L, N), [1, 1, 0, 0, 1, 1, 0, 0]),
        summary("reroute-fastv@72", method_config("reroute-fastv@72", L, N), [1, 1, 0, 0, 1, 1, 0, 0]),
    ]
    found = {f"{d.method}@{d.tier}": d for d in designs(runs)}
    assert set(found) == {"pdrop@24", "fastv@72"}
    cs = contrasts_of(found["pdrop@24"])
    assert cs["schedule (both pruned)"][1] == pytest.approx(1.0 - 5 / 8)
    assert cs["action on the Reroute schedule"][1] == pytest.approx(6 / 8 - 1.0)
    assert cs["action on the base schedule"][1] == pytest.approx(4 / 8 - 5 / 8)
    assert cs["net (Reroute variant - base method)"][1] == pytest.approx(6 / 8 - 5 / 8)
    fastv = found["fastv@72"]
    assert fastv.cell("reroute/prune") is runs[4] and fastv.cell("base/reroute") is runs[4]
    cs = contrasts_of(fastv)
    assert cs["schedule (both pruned)"] == "identical" and cs["action on the base schedule"] == "identical"
    assert cs["net (Reroute variant - base method)"] == "no item differs"  # not a measured +0.000 [0, 0]
    nuwa = designs([summary("nuwa@24", method_config("nuwa@24", L, N), [1, 0]),
                    summary("reroute-nuwa@24", method_config("reroute-nuwa@24", L, N), [1, 1])])[0]
    assert nuwa.cell("base/reroute") is nuwa.cells["base/prune"]  # stage 2 among the survivors: nothing to choose
    assert nuwa.cell("reroute/prune") is nuwa.cells["base/prune"]  # K2 re-selected from K2 keeps the same tokens
    text = "\n".join(section(runs, {"grounding": ("grounding",)}, lambda r: r.metrics["family"]))
    assert "≡ fastv@72" in text and "0 (identical by definition)" in text
    # the grounding column counts the grounding items only (odd items 1, 3, 5, 7): 4/4 - 3/4
    line = next(l for l in text.splitlines() if l.startswith("| pdrop@24 | schedule"))
    assert "+0.250" in line.split("|")[4]


def test_decision_statistics_are_the_means_of_the_stored_decisions():
    d = lambda layer, ev, re, ages, rev, rre: {"layer": layer, "action": "reroute", "evicted": ev, "readmitted": re,
                                                "ages": ages, "relevant_evicted": rev, "relevant_readmitted": rre}
    decisions = [[d(3, 10, 0, [], 1, 0), d(6, 4, 4, [3, 3, 3, 3], 0, 2)],
                 [d(3, 12, 0, [], 3, 0), d(6, 2, 2, [3, 6], None, None)]]
    stats = decision_stats(summary("reroute-fastv@72", method_config("reroute-fastv@72", 12, 144), [1, 0],
                                   decisions))
    assert [s["layer"] for s in stats] == [3, 6]
    assert stats[0]["evicted"] == 11 and stats[0]["readmitted"] == 0 and np.isnan(stats[0]["age"])
    assert stats[1]["readmitted"] == 3 and stats[1]["age"] == pytest.approx(21 / 6)
    assert stats[0]["relevant_evicted"] == 2 and stats[1]["relevant_readmitted"] == 2  # over items with relevance


def test_a_grid_can_run_a_methods_schedule_under_the_other_action():
    grid = parse_grid({"name": "g", "version": 1, "model": {"path": "testbed"}, "tasks": [{"name": "testbed"}],
                       "configs": [{"name": "flat", "method": "reroute-pdrop@24", "action": "prune"},
                                   {"name": "nuwa-rr", "method": "nuwa@24", "action": "reroute"},
                                   {"name": "rr-nuwa", "method": "reroute-nuwa@24:reentry=quota"}]})
    flat, nuwa_rr, rr_nuwa = (c.resolve(12, 144, "llava") for c in grid.configs)
    assert flat.action == "prune" and flat.stage_actions == ["prune"] * 4 and "reentry" not in flat.to_dict()
    assert [s.keep for s in flat.stages] == [s.keep for s in method_config("reroute-pdrop@24", 12, 144).stages]
    assert nuwa_rr.stage_actions == ["reroute", "reroute"]
    assert rr_nuwa.reentry == "quota" and rr_nuwa.stage_actions[0] == "prune"
    with pytest.raises(ValueError, match="action"):
        parse_grid({"name": "g", "version": 1, "model": {"path": "testbed"}, "tasks": [{"name": "testbed"}],
                    "configs": [{"name": "x", "method": "fastv@72", "action": "drop"}]})
