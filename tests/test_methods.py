"""Named methods (visroute.methods): every method reaches its tier on the LLaVA-1.5-7B and Qwen2.5-VL-7B shapes
(several image sizes), counted layer by layer independently of the budget module; every Reroute variant runs at
exactly its base's avg_T; the papers' layers; a routed run on real-depth tiny shapes measures what was promised;
`visroute methods` and `--method` on the command line."""

from __future__ import annotations

import json

import pytest
import torch

from visroute import RoutingConfig, apply_routing
from visroute.budget import schedule_avg_T
from visroute.cli import main
from visroute.methods import METHODS, get_method, listing, method_config, method_preset, nuwa_plan, parse_method

TIERS = (192, 128, 64)


def layer_counts(cfg: RoutingConfig, num_layers: int, num_visual: int) -> list[int]:
    """Visual tokens active in each layer, walked layer by layer from the stages' keeps."""
    keep_at = {s.layer: s.keep for s in cfg.stages}
    active, out = num_visual, []
    for layer in range(num_layers):
        if layer in keep_at:
            active = min(keep_at[layer], active if cfg.action == "prune" else num_visual)
        out.append(active)
    return out


def avg(cfg, num_layers, num_visual) -> float:
    return sum(layer_counts(cfg, num_layers, num_visual)) / num_layers


def _qwen_sizes():
    from visroute.bench import model_config
    from visroute.families.qwen2_vl import Qwen2_5_VLAdapter

    config = model_config("qwen2.5-vl-7b")
    return {hw: Qwen2_5_VLAdapter.visual_tokens(config, *hw) for hw in [(672, 672), (480, 640), (448, 448), (336, 500)]}


QWEN = _qwen_sizes()
CASES = [("llava-1.5-7b", 32, 576, "llava")] + [("qwen2.5-vl-7b", 28, n, "qwen2_5_vl") for n in QWEN.values()]


@pytest.mark.parametrize("shape,layers,visual,family", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_reaches_its_tier(shape, layers, visual, family, name):
    for tier in TIERS:
        if tier > visual:
            continue
        cfg = method_config(f"{name}@{tier}", layers, visual, family)
        assert all(isinstance(s.keep, int) for s in cfg.stages)
        assert abs(avg(cfg, layers, visual) - tier) <= 0.5, (name, tier, avg(cfg, layers, visual))
        assert method_preset(name, tier, shape, num_visual=visual).to_dict() == cfg.to_dict()
        assert RoutingConfig.from_yaml_text(cfg.to_yaml()) == cfg


@pytest.mark.parametrize("shape,layers,visual,family", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_each_reroute_variant_runs_at_exactly_its_bases_avg_T(shape, layers, visual, family):
    variants = [m for m in METHODS.values() if m.base is not None]
    assert {m.name for m in variants} == {"reroute-fastv", "reroute-pdrop", "reroute-nuwa", "reroute-nuwa-layer0"}
    for m in variants:
        for tier in TIERS:
            cfg = m.config(tier, layers, visual, family)
            base = get_method(m.base).config(tier, layers, visual, family)
            assert cfg.action == "reroute" and base.action == "prune"
            assert sum(layer_counts(cfg, layers, visual)) == sum(layer_counts(base, layers, visual)), (m.name, tier)
            assert len(cfg.stages) > len(base.stages) or m.name == "reroute-pdrop"  # re-entry is possible


def test_the_papers_layers_and_signals():
    nuwa = {t: method_config(f"nuwa@{t}", 32, 576) for t in TIERS}
    for tier, (k1, k2, n) in {64: (112, 16, 1), 128: (224, 32, 2), 192: (336, 48, 3)}.items():
        first, second = nuwa[tier].stages
        assert (first.layer, first.keep, first.scorer, first.merge, first.scorer_options) == (0, k1, "nuwa", "nuwa",
                                                                                          {"top_n": n})
        assert (second.layer, second.keep, second.score_layer) == (16, k2, 15)
        assert nuwa[tier].scorer == "last_token_attention" and nuwa[tier].scorer_options == {}
    rr = method_config("reroute-nuwa@64", 32, 576)
    assert [(s.layer, s.keep, s.score_layer, s.action) for s in rr.stages] == [
        (0, 112, None, "prune"), (16, 16, 15, None), (20, 16, None, None), (24, 16, None, None), (28, 16, None, None)]
    rr = method_config("reroute-nuwa-layer0@64:scoring=previous", 32, 576)
    assert [(s.layer, s.keep, s.score_layer, s.action) for s in rr.stages] == [
        (0, 112, None, None), (16, 16, 15, None), (20, 16, 19, None), (24, 16, 23, None), (28, 16, 27, None)]
    qwen = method_config("nuwa@64", 28, 576, "qwen2_5_vl")
    assert [(s.layer, s.score_layer) for s in qwen.stages] == [(0, None), (15, 14)]
    assert qwen.scorer_options == {"queries": 3, "heads": "max"} and qwen.stages[0].merge_options == {"variant": "qwen"}
    assert qwen.stages[0].scorer_options == {"top_n": 3}  # the released 0.25 setting (64 / 576 is nearest to it)
    k1, k2 = qwen.stages[0].keep, qwen.stages[1].keep
    assert abs(k2 / k1 - 0.42) < 0.05  # its stage-2 ratio, rounded to keeps that hit the tier
    assert [(s.layer, s.score_layer) for s in method_config("fastv@128", 32, 576).stages] == [(3, 2)]
    assert [s.layer for s in method_config("pdrop@128", 32, 576).stages] == [2, 7, 15, 23]
    assert [s.layer for s in method_config("pdrop@128", 28, 576).stages] == [2, 6, 13, 20]
    sparse = method_config("sparsevlm@128", 32, 576)
    assert [(s.layer, s.score_layer) for s in sparse.stages] == [(3, 2), (7, 6), (16, 15)]
    assert sparse.scorer == "text_attention" and sparse.scorer_options == {"raters": True}
    vz = method_config("visionzip@64", 32, 576).stages
    assert [(s.layer, s.keep, s.scorer, s.merge) for s in vz] == [(0, 64, None, "visionzip")]
    assert method_config("visionzip@64", 32, 576).scorer == "visionzip"
    assert method_config("divprune@128", 32, 576).scorer == "diversity"
    dart = method_config("dart@64", 32, 576)
    assert dart.scorer == "duplication" and [s.layer for s in dart.stages] == [2]
    assert [s.layer for s in method_config("reroute-fastv@64", 32, 576).stages] == [3, 7, 15, 23]


def test_nuwa_plan_gives_enough_regions():
    for tier in TIERS:
        for n in QWEN.values():
            plan = nuwa_plan(tier, 28, n, "qwen2_5_vl")
            assert plan.keep1 <= plan.top_n * n / 4 + n ** 0.5  # even-grid regions offer top_n each (odd: a few more)


def test_specs_and_errors():
    assert parse_method("nuwa@64") == ("nuwa", 64)
    assert parse_method("pdrop@100.5") == ("pdrop", 100.5)
    with pytest.raises(ValueError, match="Unknown method"):
        parse_method("nope@64")
    with pytest.raises(ValueError, match="NAME@TIER"):
        parse_method("nuwa")
    with pytest.raises(ValueError, match="tier"):
        parse_method("nuwa@big")
    with pytest.raises(ValueError, match="out of reach"):
        method_config("visionzip@192", 32, 100)
    with pytest.raises(ValueError, match="out of reach"):
        method_config("fastv@64", 28, 1024)  # layers 0-2 alone average more than 64
    rows = listing(32, 576)
    assert {r["method"] for r in rows} == set(METHODS) and len(rows) == 3 * len(METHODS)
    assert all(abs(r["avg_T"] - r["tier"]) <= 0.5 for r in rows)


# ---- routed runs on real-depth tiny shapes ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llava_shape():
    from visroute.bench import build_model, make_inputs

    model = build_model("llava-1.5-tiny", torch.float32)
    return model, make_inputs(model, "llava-1.5-tiny", text_tokens=8)


@pytest.mark.parametrize("name", list(METHODS))
def test_a_routed_run_measures_the_solved_avg_T(tiny_llava_shape, name):
    model, inputs = tiny_llava_shape
    cfg = method_preset(name, 64, "llava-1.5-tiny")
    with apply_routing(model, cfg) as router, torch.no_grad():
        model(**inputs)
    assert router.last_record.avg_T == pytest.approx(schedule_avg_T(cfg, 32, 576))
    assert abs(router.last_record.avg_T - 64) <= 0.5


def test_qwen_nuwa_runs_its_variant_on_a_real_depth_shape():
    from visroute.bench import build_model, make_inputs

    model = build_model("qwen2.5-vl-tiny", torch.float32)
    inputs = make_inputs(model, "qwen2.5-vl-tiny", text_tokens=8, image_size=(448, 448))
    nv = int((inputs["input_ids"] == model.config.image_token_id).sum())
    for name in ("nuwa", "reroute-nuwa"):
        cfg = method_preset(name, 64, "qwen2.5-vl-tiny", num_visual=nv)
        with apply_routing(model, cfg) as router, torch.no_grad():
            model(**inputs)
        assert router.last_record.avg_T == pytest.approx(schedule_avg_T(cfg, 28, nv))
        if name == "reroute-nuwa":  # rerouting changed something: a token left out earlier came back
            stages = router.last_record.stages
            assert any((b.active & ~a.active).any() for a, b in zip(stages, stages[1:]))


# ---- command line ----------------------------------------------------------------------------------------------
def test_methods_command_lists_every_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in METHODS:
        assert f"\n{name}\n" in out
    assert "@64   avg_T   64.00  prune, last_token_attention: 0:112 (nuwa top_n=1, merge nuwa), 16:16 (scored at 15)" in out
    assert main(["methods", "--shape", "qwen2.5-vl-7b", "--image-size", "480x640", "--tier", "64"]) == 0
    assert "queries=3 heads=max" in capsys.readouterr().out


def test_bench_takes_methods(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--shape", "llava-1.5-tiny", "--dtype", "float32", "--method", "nuwa@64", "--method",
               "reroute-nuwa@64", "--repeats", "1", "--warmup", "0", "--decode-repeats", "0", "--text-tokens", "8",
               "--no-keep-all", "--no-memory", "--quiet", "--out", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["label"] for r in rows] == ["unrouted", "nuwa@64", "reroute-nuwa@64"]
    assert [r["avg_T"] for r in rows[1:]] == [64.0, 64.0]
    assert main(["bench", "--shape", "llava-1.5-tiny", "--method", "nope@64"]) == 2
    assert "Unknown method" in capsys.readouterr().err


def test_generate_takes_a_method(saved_llava, capsys):
    folder, image = saved_llava
    # the saved tiny LLaVA: 6 layers, 16 visual tokens; nuwa@8 keeps 14 then 2 from layer 3: avg_T 8
    rc = main(["generate", "--model", str(folder), "--image", str(image), "--prompt", "what is the colour ?",
               "--method", "nuwa@8", "--max-new-tokens", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "avg_T (visual tokens per layer): 8.0" in out
    assert main(["generate", "--model", str(folder), "--image", str(image), "--prompt", "x", "--method",
                 "fastv@64"]) == 2
    assert "out of reach" in capsys.readouterr().err
    assert main(["generate", "--model", str(folder), "--image", str(image), "--prompt", "x", "--method",
                 "nuwa@8", "--stages", "1:4"]) == 2
    assert "one of --config, --stages or --method" in capsys.readouterr().err
    assert main(["generate", "--model", str(folder), "--image", str(image), "--prompt", "x", "--method",
                 "nuwa@8", "--scorer-option", "heads=max"]) == 2
    assert "a --method sets its own scorers" in capsys.readouterr().err
