"""The six semantic rules of docs/DESIGN.md, for both actions, on tiny random-weight models of each family with a
padded batch of 3 different prompts (several images per sample; for Qwen, images of different sizes). Rules 1 and
5 for every scorer: test_contract.py; rules 2 and 3 on random schedules: test_randomized_schedules.py."""

import contextlib

import pytest
import torch

from oracle import masked_forward, masked_run, text_positions
from tiny import VOCAB
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
    ref_model = any_fam.eager
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
NO_SPECIAL = list(range(99, VOCAB))  # generated tokens stay text: no image placeholder or vision marker


@contextlib.contextmanager
def decoder_positions(model):
    """Collects the position ids `generate` passes to the text decoder, call after call: yields a function that
    returns them concatenated (prefill, then every decode step)."""
    calls = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["position_ids"]), with_kwargs=True)
    try:
        yield lambda: torch.cat(calls, -1)
    finally:
        hook.remove()


def _generate(model, inputs, cfg, steps, **kw):
    with apply_routing(model, cfg) as router, decoder_positions(model) as positions, torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             suppress_tokens=NO_SPECIAL, return_dict_in_generate=True, output_logits=True, **kw)
    return gen, router.last_record, positions()


@pytest.mark.parametrize("action", ACTIONS)
def test_cached_decoding_equals_the_oracle_over_prompt_and_generated_tokens(any_fam, action):
    """Each decode step's logits equal the masking oracle's over prompt + the tokens generated so far, with the
    prefill's decisions (generated tokens are text: active in every layer)."""
    model, inputs = any_fam.model, any_fam.batch()
    cfg = RoutingConfig(action=action, scorer="last_token_attention", stages=[Stage(1, 0.5), Stage(3, 0.25)])
    steps = 9
    gen, record, positions = _generate(model, inputs, cfg, steps)
    length = inputs["input_ids"].shape[1]
    generated = gen.sequences[:, length:-1]  # the last token is never fed back
    ref = masked_run(any_fam.eager, inputs, any_fam.image_token_id, oracle_stages(record), action,
                     generated=generated, position_ids=positions).logits
    assert len(gen.logits) == steps
    for t, step_logits in enumerate(gen.logits):
        torch.testing.assert_close(step_logits, ref[:, length - 1 + t], atol=5e-5, rtol=1e-4)
    # the cache really holds fewer tokens in the routed layers (the decoded ones are in every layer)
    keys = [layer.keys.shape[2] for layer in gen.past_key_values.layers]
    visual = record.num_visual
    text = inputs["attention_mask"].sum(1) - visual
    assert keys[0] - keys[-1] == int(inputs["attention_mask"].sum(1).max()) - int((text + visual // 4).max()) > 0
    # and an oracle that decodes from other decisions disagrees
    other = [(layer, act.roll(1, dims=1) & act) for layer, act in oracle_stages(record)]
    wrong = masked_run(any_fam.eager, inputs, any_fam.image_token_id, other, action, generated=generated,
                       position_ids=positions).logits
    assert (wrong[:, length - 1 + steps - 1] - gen.logits[-1]).abs().max() > 1e-3


@pytest.mark.parametrize("action", ACTIONS)
def test_beam_search_decodes_what_the_oracle_computes(fam, action):
    """Beam search with 2 beams returning 2 sequences per sample: generate expands the batch before the prefill
    and reorders the routed cache at every step; each returned sequence's step logits (read from the beam that
    produced its token) equal the oracle's over its own prompt + tokens."""
    model, inputs = fam.model, fam.batch()
    cfg = RoutingConfig(action=action, scorer="last_token_attention", stages=[Stage(1, 0.5), Stage(3, 0.25)])
    steps, beams = 8, 2
    gen, record, positions = _generate(model, inputs, cfg, steps, num_beams=beams, num_return_sequences=beams)
    rows = [i for i in range(3) for _ in range(beams)]  # sample of each expanded row and returned sequence
    assert record.batch_size == len(rows)
    for st in record.stages:  # the copies of a sample were routed alike
        assert torch.equal(st.active, st.active[::beams].repeat_interleave(beams, 0))
    length = inputs["input_ids"].shape[1]
    sequences = gen.sequences
    assert sequences.shape == (len(rows), length + steps)
    assert any(not torch.equal(sequences[j], sequences[j + 1]) for j in range(0, len(rows), beams))
    ref = masked_run(fam.eager, fam.select(inputs, rows), fam.image_token_id, oracle_stages(record), action,
                     generated=sequences[:, length:-1], position_ids=positions).logits
    for t in range(steps):
        produced = gen.logits[t][gen.beam_indices[:, t]]  # (sequences, V): the row each token came from
        torch.testing.assert_close(produced, ref[:, length - 1 + t], atol=5e-5, rtol=1e-4)


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
