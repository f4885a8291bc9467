"""The six semantic rules of DESIGN.md, for both actions, on tiny random-weight models of each family with a
padded batch of 3 different prompts (several images per sample; for Qwen, images of different sizes)."""

import pytest
import torch

from oracle import eager_copy, masked_forward, text_positions
from visroute import RoutingConfig, Stage, apply_routing

ACTIONS = ["prune", "reroute"]
SCHEDULES = {
    "two-stage": [Stage(1, 0.5), Stage(3, 0.25)],
    "layer0-int": [Stage(0, 0.6), Stage(2, 5), Stage(4, 0.1)],
}


def routed_logits(model, inputs, cfg, **kw):
    with apply_routing(model, cfg) as router, torch.no_grad():
        out = model(**inputs, **kw)
        return out, router.last_record


def oracle_stages(record):
    return [(st.layer, st.active) for st in record.stages]


# Rule 1 ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("action", ACTIONS)
def test_keep_all_equals_unmodified(any_fam, action):
    model, inputs = any_fam.model, any_fam.batch()
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_gen = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    cfg = RoutingConfig(action=action, scorer="last_token_attention", stages=[Stage(0, 1.0), Stage(2, 10_000), Stage(4, 1.0)])
    out, rec = routed_logits(model, inputs, cfg)
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(out.logits[valid], ref[valid], atol=2e-5, rtol=1e-5)
    assert all(all(st.clipped) for st in rec.stages[1:2])  # keep 10000 > visual tokens: all kept, and said so
    with apply_routing(model, cfg), torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(gen, ref_gen)


# Rules 2 and 3 -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("action", ACTIONS)
def test_routed_equals_masking_oracle(any_fam, action, schedule):
    model, inputs = any_fam.model, any_fam.batch()
    cfg = RoutingConfig(action=action, scorer="last_token_attention", stages=SCHEDULES[schedule])
    out, rec = routed_logits(model, inputs, cfg)
    # selections really drop something, and prune never brings a token back
    assert any(int(st.kept[i]) < int(rec.num_visual[i]) for st in rec.stages for i in range(3))
    if action == "prune":
        for a, b in zip(rec.stages, rec.stages[1:]):
            assert not (b.active & ~a.active).any()
    ref_model = eager_copy(model, any_fam.build)
    ref, _ = masked_forward(ref_model, inputs, any_fam.image_token_id, oracle_stages(rec), action)
    text = text_positions(inputs, any_fam.image_token_id)
    torch.testing.assert_close(out.logits[text], ref[text], atol=5e-5, rtol=1e-4)
    # and the oracle with different selections disagrees (the comparison can fail)
    flipped = [(layer, act.roll(1, dims=1) & (act | act.roll(1, dims=1))) for layer, act in oracle_stages(rec)]
    other, _ = masked_forward(ref_model, inputs, any_fam.image_token_id, flipped, action)
    assert (other[text] - out.logits[text]).abs().max() > 1e-3


def test_reroute_tokens_come_back(fam):
    model, inputs = fam.model, fam.batch()
    cfg = RoutingConfig(action="reroute", scorer="random", stages=[Stage(1, 0.3), Stage(3, 0.3)])
    _, rec = routed_logits(model, inputs, cfg)
    first, second = rec.stages
    assert (second.active & ~first.active).any()  # a bypassed token re-entered


# Rule 4 ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("action", ACTIONS)
def test_cached_decoding_equals_replay(any_fam, action):
    model, inputs = any_fam.model, any_fam.batch()
    cfg = RoutingConfig(action=action, scorer="last_token_attention", stages=[Stage(1, 0.5), Stage(3, 0.25)])
    steps = 5
    with apply_routing(model, cfg) as router, torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
        record = router.last_record
        length = inputs["input_ids"].shape[1]
        full = dict(inputs)
        full["input_ids"] = gen.sequences
        full["attention_mask"] = torch.cat(
            [inputs["attention_mask"], torch.ones(3, steps, dtype=torch.long)], 1)
        if "mm_token_type_ids" in full:
            full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros(3, steps, dtype=torch.long)], 1)
        with router.replaying(record):
            replay = model(**full, use_cache=False).logits
    for t, step_logits in enumerate(gen.logits):
        torch.testing.assert_close(step_logits, replay[:, length - 1 + t], atol=5e-5, rtol=1e-4)
    # the K/V cache really holds fewer tokens in the routed layers
    assert (record.kv_tokens[-1] < record.kv_tokens[0]).all()


# Rule 5 ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("action", ACTIONS)
def test_padded_batch_equals_alone(fam, action):
    model, inputs = fam.model, fam.batch()
    cfg = RoutingConfig(action=action, scorer="last_token_attention", stages=[Stage(0, 0.5), Stage(2, 0.3)])
    out, rec = routed_logits(model, inputs, cfg)
    text = text_positions(inputs, fam.image_token_id)
    for i in range(3):
        alone = fam.single(i)
        out_i, rec_i = routed_logits(model, alone, cfg)
        for st, st_i in zip(rec.stages, rec_i.stages):
            assert torch.equal(st.selected[i], st_i.selected[0])
        text_i = text_positions(alone, fam.image_token_id)[0]
        torch.testing.assert_close(out.logits[i][text[i]], out_i.logits[0][text_i], atol=5e-5, rtol=1e-4)
        assert rec.kv_tokens[:, i].tolist() == rec_i.kv_tokens[:, 0].tolist()


# Rule 6 ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("action", ACTIONS)
def test_text_only_passes_through(fam, action):
    model = fam.model
    ids = torch.tensor([[0, 0, 1, 5, 6, 7], [1, 8, 9, 10, 11, 12]])
    inputs = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    cfg = RoutingConfig(action=action, scorer="last_token_attention", stages=[Stage(0, 0.1)])
    with apply_routing(model, cfg) as router, torch.no_grad():
        out = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert router.last_record is None
    assert torch.equal(out, ref)
    assert torch.equal(gen, ref_gen)
