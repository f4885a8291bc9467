"""Per-stage scorers, scores taken at an earlier layer, merging at a layer-0 stage, and pinned tokens: each
against an independent reference (the unmodified model with eager attention and explicit masks, and slow
loops written from the definitions)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from oracle import eager_copy, masked_forward, text_positions
from tiny import IMAGE_TOKEN, llava_batch, tiny_llava
from visroute import RoutingConfig, Stage, apply_routing
from visroute.config import parse_stages

PROMPTS = [[1, 5, 6, 7, 8], [1, 9, 10], [1, 11, 12, 13, 14, 15]]


@pytest.fixture(scope="module")
def setup():
    model = tiny_llava()
    inputs = llava_batch(model, PROMPTS, [1, 2, 1])
    return model, inputs, eager_copy(model, lambda attn: tiny_llava(attn=attn))


def routed(model, inputs, cfg, **call):
    with apply_routing(model, cfg) as router, torch.no_grad(), router.call_options(**call):
        out = model(**inputs)
    return out.logits, router.last_record


def eager_last_token_top(ref, inputs, stages, layer, candidates, keep):
    """Per sample, the top-`keep` candidates by the eager model's attention from the last prompt token at
    `layer` (mean over heads), the unmodified model masked by `stages`."""
    _, attn = masked_forward(ref, inputs, IMAGE_TOKEN, stages, "prune", capture_attn_layer=layer)
    picks = []
    for b in range(inputs["input_ids"].shape[0]):
        pos = inputs["input_ids"][b].eq(IMAGE_TOKEN).nonzero().flatten()
        row = attn[b, :, -1, pos].mean(0)  # left padding: the last position is the last prompt token
        row = torch.where(candidates[b, : len(pos)], row, torch.tensor(float("-inf")))
        picks.append(set(row.topk(keep).indices.tolist()))
    return picks


def test_each_stage_ranks_with_its_own_scorer(setup):
    model, inputs, ref = setup
    cfg = RoutingConfig("prune", "last_token_attention",
                        [Stage(0, 10, scorer="random", scorer_options={"seed": 3}), Stage(2, 4)])
    logits, rec = routed(model, inputs, cfg)
    alone = routed(model, inputs, RoutingConfig("prune", "random", [Stage(0, 10)], {"seed": 3}))[1]
    assert all(torch.equal(a, b) for a, b in zip(rec.stages[0].selected, alone.stages[0].selected))
    first = rec.stages[0].active
    expected = eager_last_token_top(ref, inputs, [(0, first)], 2, first, 4)
    assert [set(s.tolist()) for s in rec.stages[1].selected] == expected
    oracle, _ = masked_forward(ref, inputs, IMAGE_TOKEN, [(st.layer, st.active) for st in rec.stages], "prune")
    text = text_positions(inputs, IMAGE_TOKEN)
    torch.testing.assert_close(logits[text], oracle[text], atol=5e-5, rtol=1e-4)


def test_scores_can_come_from_an_earlier_layer(setup):
    model, inputs, ref = setup
    cfg = RoutingConfig("prune", "last_token_attention", [Stage(1, 8), Stage(4, 3, score_layer=2)])
    logits, rec = routed(model, inputs, cfg)
    first = rec.stages[0].active
    at_2 = eager_last_token_top(ref, inputs, [(1, first)], 2, first, 3)
    at_4 = eager_last_token_top(ref, inputs, [(1, first)], 4, first, 3)
    assert at_2 != at_4  # the option changes what is kept here, so the comparison can fail
    assert [set(s.tolist()) for s in rec.stages[1].selected] == at_2
    assert rec.stages[1].score_layer == 2 and rec.stages[0].score_layer == 1
    oracle, _ = masked_forward(ref, inputs, IMAGE_TOKEN, [(st.layer, st.active) for st in rec.stages], "prune")
    text = text_positions(inputs, IMAGE_TOKEN)
    torch.testing.assert_close(logits[text], oracle[text], atol=5e-5, rtol=1e-4)
    # the same schedule scored at its own layer keeps what layer 4's attention says
    _, own = routed(model, inputs, RoutingConfig("prune", "last_token_attention", [Stage(1, 8), Stage(4, 3)]))
    assert [set(s.tolist()) for s in own.stages[1].selected] == at_4


def slow_similarity_average(embeds: torch.Tensor, positions: list[torch.Tensor], images: list[list[range]],
                            kept: list[torch.Tensor]) -> torch.Tensor:
    """The merged input embeddings, one token at a time: each dropped visual token joins the kept token of its
    image with the largest cosine similarity; a kept token becomes the mean of itself and those joining it."""
    out = embeds.clone()
    for b, pos in enumerate(positions):
        x = embeds[b, pos].float()
        keep = set(kept[b].tolist())
        members = {k: [k] for k in keep}
        for span in images[b]:
            span_kept = [k for k in span if k in keep]
            for d in span:
                if d in keep or not span_kept:
                    continue
                sims = [float(F.cosine_similarity(x[d], x[k], dim=0)) for k in span_kept]
                members[span_kept[max(range(len(sims)), key=lambda i: (sims[i], -i))]].append(d)
        for k, group in members.items():
            out[b, pos[k]] = x[group].mean(0).to(out.dtype)
    return out


@pytest.mark.parametrize("action", ["prune", "reroute"])
def test_a_merging_stage_equals_the_model_fed_the_merged_embeddings(setup, action):
    model, inputs, ref = setup
    stages = [Stage(0, 6, scorer="random", merge="similarity_average")]
    if action == "reroute":
        stages.append(Stage(2, 5))  # bypassed tokens come back with their own, unmerged embedding
    logits, rec = routed(model, inputs, RoutingConfig(action, "last_token_attention", stages))
    positions = [row.eq(IMAGE_TOKEN).nonzero().flatten() for row in inputs["input_ids"]]
    per_image = model.config.image_seq_length
    images = [[range(i * per_image, (i + 1) * per_image) for i in range(len(p) // per_image)] for p in positions]

    def feed_merged(module, args, kwargs):
        kwargs["inputs_embeds"] = slow_similarity_average(kwargs["inputs_embeds"], positions, images,
                                                          rec.stages[0].selected)
        return args, kwargs

    hook = ref.model.language_model.register_forward_pre_hook(feed_merged, with_kwargs=True)
    try:
        oracle, _ = masked_forward(ref, inputs, IMAGE_TOKEN, [(st.layer, st.active) for st in rec.stages], action)
    finally:
        hook.remove()
    plain, _ = masked_forward(ref, inputs, IMAGE_TOKEN, [(st.layer, st.active) for st in rec.stages], action)
    text = text_positions(inputs, IMAGE_TOKEN)
    torch.testing.assert_close(logits[text], oracle[text], atol=5e-5, rtol=1e-4)
    assert (plain[text] - logits[text]).abs().max() > 1e-3  # merging changed the answer: the check can fail


def test_pinned_tokens_stay_active_and_count_towards_the_keep(setup, monkeypatch):
    model, inputs, ref = setup
    cfg = RoutingConfig("reroute", "last_token_attention", [Stage(1, 5), Stage(3, 2)])
    with apply_routing(model, cfg) as router, torch.no_grad():
        layout = router.adapter.layout

        def pin_first(call, valid):
            out = layout(call, valid)
            out.pinned = torch.zeros_like(out.valid)
            out.pinned[:, 0] = True
            return out

        monkeypatch.setattr(router.adapter, "layout", pin_first)
        logits = model(**inputs).logits
        rec = router.last_record
    for st in rec.stages:
        assert st.active[:, 0].all()
        assert st.kept.tolist() == [st.keep] * 3  # the pinned token is one of the `keep`
    oracle, _ = masked_forward(ref, inputs, IMAGE_TOKEN, [(st.layer, st.active) for st in rec.stages], "reroute")
    text = text_positions(inputs, IMAGE_TOKEN)
    torch.testing.assert_close(logits[text], oracle[text], atol=5e-5, rtol=1e-4)


def test_scores_taken_early_have_their_flops_measured(setup):
    model, inputs, _ = setup
    cfg = RoutingConfig("prune", "last_token_attention", [Stage(1, 8), Stage(4, 3, score_layer=2)])
    with apply_routing(model, cfg, measure_scorer_flops=True) as router, torch.no_grad():
        model(**inputs)
    flops = [st.scorer_flops for st in router.last_record.stages]
    assert all(f is not None and f > 0 for f in flops), flops


def test_per_stage_fields_round_trip_and_parse():
    cfg = RoutingConfig("reroute", "last_token_attention", parse_stages(
        "0:112:scorer=vision_cls_attention:merge=similarity_average,16:16:score_layer=15"))
    assert cfg.stages == [Stage(0, 112, scorer="vision_cls_attention", merge="similarity_average"),
                          Stage(16, 16, score_layer=15)]
    assert RoutingConfig.from_yaml_text(cfg.to_yaml()) == cfg
    assert RoutingConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    assert Stage(3, 8).to_dict() == {"layer": 3, "keep": 8}  # plain stages stay plain
    assert cfg.scorer_of(cfg.stages[0]) == ("vision_cls_attention", {})
    assert cfg.scorer_of(cfg.stages[1]) == ("last_token_attention", {})


@pytest.mark.parametrize("stages, message", [
    ([{"layer": 2, "keep": 4, "merge": "similarity_average"}], "Only a stage at layer 0"),
    ([{"layer": 2, "keep": 4, "score_layer": 3}], "score_layer must lie in 0..layer"),
    ([{"layer": 2, "keep": 8}, {"layer": 5, "keep": 4, "score_layer": 1}], "before the previous stage"),
    ([{"layer": 2, "keep": 4, "scorer_options": {"seed": 1}}], "need Stage.scorer"),
    ([{"layer": 2, "keep": 4, "scorer": "random", "scorer_options": {"seed": "x"}}], "Option 'seed' of scorer"),
    ([{"layer": 0, "keep": 4, "merge": "nope"}], "Unknown merge"),
    ([{"layer": 2, "keep": 4, "prune": True}], "Unknown stage fields"),
    ([{"keep": 4}], "needs layer"),
])
def test_bad_stage_options_are_clear_errors(stages, message):
    with pytest.raises(ValueError, match=message):
        RoutingConfig.from_dict({"action": "prune", "scorer": "last_token_attention", "stages": stages})


def test_call_inputs_come_from_every_stage_scorer(setup):
    model, _, _ = setup
    cfg = RoutingConfig("prune", "random", [Stage(0, 8), Stage(2, 4, scorer="oracle")])
    with apply_routing(model, cfg) as router:
        assert router.call_inputs == {"relevance"}
    with apply_routing(model, RoutingConfig("prune", "random", [Stage(0, 8)])) as router:
        assert router.call_inputs == set()
