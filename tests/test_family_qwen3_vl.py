"""Qwen3-VL and Qwen3-VL-MoE under routing: DeepStack features follow their tokens (families/qwen3_vl.py), checked
against the eager masking oracle, which adds every feature to every visual position after its decoder layer as
the unmodified model does; stages before the decoder, inside the DeepStack range (layers 0-2, three taps here)
and after it; padded batches of several images of different sizes."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import oracle
from conftest import PROMPTS
from oracle import eager_copy, masked_run, text_positions
from tiny import QWEN_IMAGE, qwen_batch, tiny_qwen3_vl
from visroute import RoutingConfig, Stage, apply_routing
from visroute.families import families
from visroute.families.qwen3_vl import QWEN3_MAX_PIXELS, QWEN3_MIN_PIXELS, Qwen3VLAdapter

BUILD = {"qwen3_vl": partial(tiny_qwen3_vl, deepstack=3), "qwen3_vl_moe": partial(tiny_qwen3_vl, True, deepstack=3)}
IMAGES = [[(8, 8)], [(4, 8), (8, 4)], [(8, 12)]]  # patch grids (before the 2 x 2 merge)
ACTIONS = ("prune", "reroute")
SCHEDULES = {
    "before-decoder": ("vision_cls_attention", [Stage(0, 5), Stage(4, 0.5)]),
    "inside-deepstack": ("last_token_attention", [Stage(1, 0.5), Stage(2, 0.3)]),
    "across": ("random", [Stage(0, 0.6), Stage(2, 5), Stage(4, 0.1)]),
}
_MODELS: dict = {}


def models(name):
    """(model, eager copy, padded batch) of a tiny model of the family, built once."""
    if name not in _MODELS:
        model = BUILD[name]()
        _MODELS[name] = (model, eager_copy(model, BUILD[name]), qwen_batch(model, PROMPTS, IMAGES))
    return _MODELS[name]


def routed(model, inputs, cfg):
    with apply_routing(model, cfg) as router, torch.no_grad():
        return model(**inputs).logits, router.last_record


def decisions(record):
    return [(st.layer, st.active) for st in record.stages]


@pytest.mark.parametrize("name", BUILD)
@pytest.mark.parametrize("action", ACTIONS)
def test_keep_all_equals_the_unmodified_model(name, action):
    model, _, inputs = models(name)
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_gen = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    cfg = RoutingConfig(action, "last_token_attention", [Stage(0, 1.0), Stage(1, 10_000), Stage(3, 1.0)])
    logits, _ = routed(model, inputs, cfg)
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[valid], ref[valid], atol=2e-5, rtol=1e-5)
    with apply_routing(model, cfg), torch.no_grad():
        assert torch.equal(model.generate(**inputs, max_new_tokens=5, do_sample=False), ref_gen)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name", BUILD)
@pytest.mark.parametrize("action", ACTIONS)
def test_routed_equals_the_masking_oracle_with_deepstack(name, action, schedule, monkeypatch):
    model, eager, inputs = models(name)
    scorer, stages = SCHEDULES[schedule]
    logits, record = routed(model, inputs, RoutingConfig(action, scorer, stages))
    assert any(int(st.kept[i]) < int(record.num_visual[i]) for st in record.stages for i in range(3))
    text = text_positions(inputs, QWEN_IMAGE)
    ref = masked_run(eager, inputs, QWEN_IMAGE, decisions(record), action).logits
    torch.testing.assert_close(logits[text], ref[text], atol=5e-5, rtol=1e-4)
    # the features matter: the oracle without them disagrees
    call = oracle.decoder_call
    monkeypatch.setattr(oracle, "decoder_call", lambda m, i: {k: v for k, v in call(m, i).items()
                                                               if k != "deepstack_visual_embeds"})
    blind = masked_run(eager, inputs, QWEN_IMAGE, decisions(record), action).logits
    assert (blind[text] - logits[text]).abs().max() > 1e-3


@pytest.mark.parametrize("name", BUILD)
def test_bypassed_tokens_carry_their_features_and_resume_with_them(name, monkeypatch):
    """Under reroute, tokens bypassed through layers 1-2 receive features 1 and 2 in their carried state (as the
    unmodified model adds them to every visual position) and resume from it at layer 3; leaving the carried
    states out gives other logits than the oracle."""
    model, eager, inputs = models(name)
    cfg = RoutingConfig("reroute", "random", [Stage(1, 0.3), Stage(3, 1.0)])
    logits, record = routed(model, inputs, cfg)
    assert (record.stages[1].active & ~record.stages[0].active).any()  # bypassed tokens came back
    text = text_positions(inputs, QWEN_IMAGE)
    ref = masked_run(eager, inputs, QWEN_IMAGE, decisions(record), "reroute").logits
    torch.testing.assert_close(logits[text], ref[text], atol=5e-5, rtol=1e-4)

    original = Qwen3VLAdapter.after_layer

    def compact_rows_only(self, layer_index, hidden, index, valid, state):
        actions = [st.action for st in state.record.stages]
        for st in state.record.stages:  # as if every stage pruned: skips the carried states
            st.action = "prune"
        try:
            return original(self, layer_index, hidden, index, valid, state)
        finally:
            for st, action in zip(state.record.stages, actions):
                st.action = action

    monkeypatch.setattr(Qwen3VLAdapter, "after_layer", compact_rows_only)
    with apply_routing(model, cfg) as router, torch.no_grad(), router.replaying(record):
        wrong = model(**inputs).logits
    assert (wrong[text] - ref[text]).abs().max() > 1e-3


@pytest.mark.parametrize("action", ACTIONS)
def test_a_stage_before_the_decoder_runs_only_the_kept_tokens_and_their_features(action):
    model, eager, inputs = models("qwen3_vl")
    seen = []
    hook = model.model.language_model.layers[0].register_forward_pre_hook(
        lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).shape[1]), with_kwargs=True)
    try:
        logits, record = routed(model, inputs, RoutingConfig(action, "vision_cls_attention", [Stage(0, 3)]))
    finally:
        hook.remove()
    text = (inputs["attention_mask"].bool() & inputs["input_ids"].ne(QWEN_IMAGE)).sum(1)
    assert seen == [int((text + 3).max())]
    ref = masked_run(eager, inputs, QWEN_IMAGE, decisions(record), action).logits
    mask = text_positions(inputs, QWEN_IMAGE)
    torch.testing.assert_close(logits[mask], ref[mask], atol=5e-5, rtol=1e-4)


def test_attention_scores_inside_the_deepstack_range_equal_eager_attention():
    """last_token_attention at layer 2 scores from layer 2's own q/k (after its q/k norms and the interleaved
    M-RoPE) over hidden states that hold features 0 and 1: the eager attention probabilities of the unmodified
    model's layer 2."""
    model, eager, inputs = models("qwen3_vl")
    _, record = routed(model, inputs, RoutingConfig("prune", "last_token_attention", [Stage(2, 0.5)]))
    run = masked_run(eager, inputs, QWEN_IMAGE, [], "prune", capture_attn_layer=2)
    last = inputs["attention_mask"].shape[1] - 1  # left padding: every sample's last prompt token
    for i, row in enumerate(inputs["input_ids"]):
        vis = row.eq(QWEN_IMAGE).nonzero().flatten()
        expected = run.attention[i, :, last, vis].mean(0)
        torch.testing.assert_close(record.stages[0].scores[i, : len(vis)], expected.float(), atol=1e-6, rtol=1e-4)


def test_video_inputs_are_refused():
    model, _, inputs = models("qwen3_vl")
    video = dict(inputs, input_ids=inputs["input_ids"].clone())
    video["input_ids"][0, -2] = model.config.video_token_id
    cfg = RoutingConfig("prune", "random", [Stage(1, 0.5)])
    with apply_routing(model, cfg), torch.no_grad():
        with pytest.raises(ValueError, match="video"):
            model(**video)
        with pytest.raises(ValueError, match="video"):
            model(**inputs, pixel_values_videos=torch.zeros(4, inputs["pixel_values"].shape[1]),
                  video_grid_thw=torch.tensor([[1, 2, 2]]))


def test_moe_router_logits_are_refused_while_routing():
    model, _, inputs = models("qwen3_vl_moe")
    with apply_routing(model, RoutingConfig("prune", "random", [Stage(1, 0.5)])), torch.no_grad():
        with pytest.raises(ValueError, match="output_router_logits"):
            model(**inputs, output_router_logits=True)
        assert model(**inputs).router_logits is None
    assert not model.model.language_model._forward_hooks  # the output hook went with the router


def test_vision_flops_match_the_flop_counter():
    """The tower's and the mergers' FLOPs (the one that feeds the input embeddings and one per DeepStack tap)
    against torch's FlopCounterMode over the model's own image encoding (eager attention, which it counts)."""
    _, eager, inputs = models("qwen3_vl")
    with apply_routing(eager, RoutingConfig()) as router, torch.no_grad():
        eager(**inputs)
        spans = [span for sample in router.last_record.images for span in sample]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        eager.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    tower, projector = Qwen3VLAdapter.vision_flops(eager.config, spans)
    assert tower + projector == counter.get_total_flops()


def test_visual_tokens_follow_the_qwen3_vl_image_processor():
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    config = Qwen3VLAdapter.build_config(next(s for s in Qwen3VLAdapter.shapes if s.name == "qwen3-vl-8b"))
    processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                                         size={"shortest_edge": QWEN3_MIN_PIXELS, "longest_edge": QWEN3_MAX_PIXELS})
    for h, w in [(100, 120), (672, 672), (300, 1000), (2000, 3000)]:
        grid = processor(images=[Image.new("RGB", (w, h))], return_tensors="pt")["image_grid_thw"][0]
        assert Qwen3VLAdapter.visual_tokens(config, h, w) == int(grid.prod()) // 4


def test_real_shape_has_the_published_parameter_count():
    from visroute.bench import model_config
    from visroute.bench.shapes import family_of

    config = model_config("qwen3-vl-8b")
    with torch.device("meta"):
        model = family_of("qwen3-vl-8b").model_class(config)(config)
    assert sum(p.numel() for p in model.parameters()) == 8_767_123_696  # Qwen3-VL-8B-Instruct
    inputs = Qwen3VLAdapter.synthetic_inputs(config, 64, 672, 672, torch.Generator().manual_seed(0))
    placeholders = int(inputs["input_ids"].eq(config.image_token_id).sum())
    assert placeholders == Qwen3VLAdapter.visual_tokens(config, 672, 672) == 441
    assert inputs["pixel_values"].shape == (42 * 42, 3 * 2 * 16 * 16)
    assert families()["qwen3_vl"].box_frame == "scale_1000"


def test_bench_runs_the_tiny_shape(tmp_path, capsys):
    from visroute.cli import main

    out = tmp_path / "bench.json"
    rc = main(["bench", "--shape", "qwen3-vl-tiny", "--dtype", "float32", "--preset", "pdrop@128", "--repeats", "1",
               "--warmup", "0", "--decode-repeats", "0", "--text-tokens", "16", "--image-size", "512x512",
               "--no-keep-all", "--no-memory", "--quiet", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    base, pdrop = json.loads(out.read_text())["results"]
    assert pdrop["avg_T"] == pytest.approx(128, abs=1) and base["avg_T"] == 256
    assert pdrop["accounting"]["flops"]["total"] < base["accounting"]["flops"]["total"]
