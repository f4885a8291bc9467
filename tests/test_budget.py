"""Schedules, the avg_T solver, presets and matched configs."""

import itertools

import pytest
import torch

from visroute import RoutingConfig, Stage, apply_routing
from visroute.budget import (
    PRESETS,
    TIERS,
    Shape,
    matched,
    parse_preset,
    preset,
    preset_solution,
    schedule_avg_T,
    solve,
)
from visroute.families.qwen2_vl import Qwen2_5_VLAdapter


def layer_counts(stages, num_layers, num_visual, action):
    """Independent per-layer active visual counts: walk the layers, apply each stage's keep."""
    keep_at = {s.layer: s for s in stages}
    active, out = num_visual, []
    for layer in range(num_layers):
        s = keep_at.get(layer)
        if s is not None:
            k = s.keep if isinstance(s.keep, int) else int(s.keep * num_visual + 1e-9)
            active = min(k, active if action == "prune" else num_visual)
        out.append(active)
    return out


MODEL_CASES = [("llava-1.5", 32, 576), ("qwen2.5-vl-7b", 28, 576), ("qwen2.5-vl-7b", 28, 391),
               ("qwen2.5-vl-7b", 28, 256), ("qwen2.5-vl-3b", 36, 576)]


@pytest.mark.parametrize("model,layers,visual", MODEL_CASES)
@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_hit_every_tier(model, layers, visual, name):
    for tier in TIERS:
        cfg = preset(name, tier, model, num_visual=visual if model != "llava-1.5" else None)
        assert all(isinstance(s.keep, int) for s in cfg.stages)
        achieved = sum(layer_counts(cfg.stages, layers, visual, cfg.action)) / layers
        assert abs(achieved - tier) <= 0.5, (name, tier, achieved)
        sol, action = preset_solution(name, tier, model, num_visual=visual)
        assert sol.avg_T == pytest.approx(achieved) and action == cfg.action
        # prune and reroute run the same counts for these non-increasing schedules
        other = "reroute" if cfg.action == "prune" else "prune"
        assert sum(layer_counts(cfg.stages, layers, visual, other)) / layers == pytest.approx(achieved)


def test_preset_layers_follow_the_papers():
    assert [s.layer for s in preset("fastv", 128).stages] == [3]
    assert [s.layer for s in preset("pdrop", 128).stages] == [2, 7, 15, 23]
    assert [s.layer for s in preset("reroute-fastv", 128).stages] == [3, 7, 15, 23]
    # the Reroute code's 28-layer normalisation of [2, 7, 15, 23]
    assert [s.layer for s in preset("pdrop", 128, "qwen2.5-vl-7b", num_visual=576).stages] == [2, 6, 13, 20]
    fv, rr = preset("fastv", 64), preset("reroute-fastv", 64)
    assert {s.keep for s in rr.stages} == {fv.stages[0].keep} and rr.action == "reroute"
    keeps = [s.keep for s in preset("pdrop", 192).stages]
    assert keeps == sorted(keeps, reverse=True)


def _best_possible(spans, before, num_layers, num_visual, target, monotone):
    """Brute force over every integer keep combination: the smallest |avg_T - target| there is."""
    best = float("inf")
    combos = (itertools.combinations_with_replacement(range(num_visual, -1, -1), len(spans)) if monotone
              else itertools.product(range(num_visual + 1), repeat=len(spans)))
    for keeps in combos:
        avg = (before + sum(s * k for s, k in zip(spans, keeps))) / num_layers
        best = min(best, abs(avg - target))
    return best


@pytest.mark.parametrize("shape", [Shape.fastv(2), Shape.pdrop([1, 3, 6, 9]), Shape.uniform([2, 5, 9]),
                                   Shape.weighted([1, 4, 8], [1, 1, 0.5])])
@pytest.mark.parametrize("target", [5.0, 9.3, 13.0, 17.77])
def test_solver_is_closest_possible(shape, target):
    num_layers, num_visual = 12, 24
    if target < shape.layers[0] * num_visual / num_layers:
        pytest.skip("below this shape's reach")
    sol = solve(shape, num_layers, num_visual, target)
    spans = [b - a for a, b in zip(shape.layers, [*shape.layers[1:], num_layers])]
    best = _best_possible(spans, shape.layers[0] * num_visual, num_layers, num_visual, target, shape.non_increasing)
    assert abs(sol.error) <= best + 1e-9
    assert sum(layer_counts(sol.stages, num_layers, num_visual, "prune")) / num_layers == pytest.approx(sol.avg_T)


def test_solver_recovers_the_papers_ratios():
    # FastV K=3 at avg 192 / 128 on LLaVA: the papers' keep ratios 0.2644 / 0.1418 of 576.
    assert solve(Shape.fastv(3), 32, 576, 192).param == pytest.approx(0.2644, abs=1e-4)
    assert solve(Shape.fastv(3), 32, 576, 128).param == pytest.approx(0.1418, abs=1e-4)
    # PyramidDrop's geometric ratio at avg 128 (their 0.4570).
    assert solve(Shape.pdrop([2, 7, 15, 23]), 32, 576, 128).param == pytest.approx(0.4570, abs=1e-3)


def test_fractions_are_floored_per_sample_as_the_engine_does():
    assert schedule_avg_T([Stage(1, 0.5)], 2, 5) == pytest.approx((5 + 2) / 2)
    assert Stage(3, 0.3).keep_count(10) == 3  # 0.3 * 10 is 2.9999999999999996 in floats
    assert torch.equal(Stage(3, 0.3).keep_counts(torch.tensor([10, 7, 0])), torch.tensor([3, 2, 0]))


def test_matched_configs_keep_avg_T():
    fv = preset("fastv", 128)
    rr = matched(fv, 32, 576, "reroute", reselect_at=[7, 15, 23])
    assert rr.action == "reroute" and [s.layer for s in rr.stages] == [3, 7, 15, 23]
    assert schedule_avg_T(rr, 32, 576) == schedule_avg_T(fv, 32, 576)
    pd = preset("pdrop", 64)
    shaped = matched(pd, 32, 576, "reroute", shape=Shape.weighted([2, 7, 15, 23], [1, 1, 0.5, 0.25]))
    assert abs(schedule_avg_T(shaped, 32, 576) - schedule_avg_T(pd, 32, 576)) <= 0.5
    # a fraction config becomes exact integer keeps with the same counts
    frac = RoutingConfig("prune", "last_token_attention", [Stage(3, 0.1418)])
    assert schedule_avg_T(matched(frac, 32, 576, "reroute"), 32, 576) == schedule_avg_T(frac, 32, 576)
    growing = RoutingConfig("reroute", "last_token_attention", [Stage(2, 10), Stage(5, 40)])
    with pytest.raises(ValueError, match="cannot"):
        matched(growing, 8, 64, "prune")


def test_errors():
    with pytest.raises(ValueError, match="tier"):
        preset("fastv", 100)
    with pytest.raises(ValueError, match="Unknown preset"):
        preset("nope", 128)
    with pytest.raises(ValueError, match="num_visual"):
        preset("fastv", 128, "qwen2.5-vl-7b")
    with pytest.raises(ValueError, match="Unknown model"):
        preset("fastv", 128, "gpt")
    with pytest.raises(ValueError, match="out of reach"):
        solve(Shape.pdrop([2, 7]), 32, 576, 20)  # layers 0-1 alone average 36
    with pytest.raises(ValueError, match="outside"):
        solve(Shape.fastv(40), 32, 576, 128)
    with pytest.raises(ValueError, match="name@tier"):
        parse_preset("fastv")
    with pytest.raises(ValueError, match="tier"):
        parse_preset("fastv@100")
    assert parse_preset("pdrop@64") == ("pdrop", 64)


def test_qwen_visual_tokens_follow_the_resize_rule():
    from visroute.bench import model_config

    config = model_config("qwen2.5-vl-7b")
    for h, w in [(672, 672), (480, 640), (336, 500), (1000, 1000)]:
        rh, rw = round(h / 28) * 28, round(w / 28) * 28  # each side to a multiple of patch * merge
        assert Qwen2_5_VLAdapter.visual_tokens(config, h, w) == (rh // 28) * (rw // 28)
    assert Qwen2_5_VLAdapter.visual_tokens(config, 4000, 4000, max_pixels=28 * 28 * 1280) <= 1280
    assert Qwen2_5_VLAdapter.visual_tokens(config) is None  # without an image size it cannot say


def test_engine_runs_the_solved_budget():
    """A routed prefill of a 32-layer model with 576 visual tokens measures the avg_T the solver promised."""
    from visroute.bench import build_model, make_inputs

    model = build_model("llava-1.5-tiny", torch.float32)
    inputs = make_inputs(model, "llava-1.5-tiny", text_tokens=8)
    for name in ("pdrop", "reroute-pdrop", "reroute-fastv"):
        sol, _ = preset_solution(name, 64)
        with apply_routing(model, preset(name, 64)) as router, torch.no_grad():
            model(**inputs)
            assert router.last_record.avg_T == pytest.approx(sol.avg_T)
