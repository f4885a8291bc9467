"""Decoders newer than Llama / Qwen2: the attention scorers and DART's key pivots apply the layer's per-head
q_norm / k_norm (Qwen3, Gemma 3, InternVL3.5 decoders), checked against the eager model's own attention
probabilities and K/V cache on a tiny LLaVA with a Qwen3 decoder, and shown to fail when the norms are left out;
and the routed decoder refuses decoder inputs it does not know instead of silently dropping them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import visroute.scoring.attention as attention_module
import visroute.scoring.redundancy as redundancy_module
from conftest import PROMPTS
from oracle import dart_reference, eager_copy, instruction_positions, visual_positions
from tiny import IMAGE_TOKEN, llava_batch, tiny_llava_qwen3
from visroute import RoutingConfig, Stage, apply_routing


@pytest.fixture(scope="module")
def qwen3_llava():
    model = tiny_llava_qwen3()
    assert hasattr(model.model.language_model.layers[0].self_attn, "q_norm")
    eager = eager_copy(model, lambda attn: tiny_llava_qwen3(attn=attn))
    inputs = llava_batch(model, PROMPTS[:2], [1, 2])
    with torch.no_grad():
        ref = eager(**inputs, output_attentions=True, output_hidden_states=True, use_cache=True)
    return model, eager, inputs, ref


class _NoQKNorm:
    """A view of a module without `q_norm` / `k_norm`: what a scorer that ignores them would compute with."""

    def __init__(self, module, inner=None):
        self._module, self._inner = module, inner

    def __getattr__(self, name):
        if name in ("q_norm", "k_norm"):
            raise AttributeError(name)
        if name == "self_attn" and self._inner is not None:
            return self._inner
        return getattr(self._module, name)


@pytest.fixture
def norms_skipped(monkeypatch):
    """The scorers' q/k projections as they were before they applied the norms."""
    original = attention_module._project

    def project(ctx, index, which, device):
        layer = _NoQKNorm(ctx.layer, _NoQKNorm(ctx.layer.self_attn))
        return original(dataclasses.replace(ctx, layer=layer), index, which, device)

    monkeypatch.setattr(attention_module, "_project", project)


def _scores(model, inputs, scorer, stages, **options):
    cfg = RoutingConfig("prune", scorer, stages, scorer_options=options)
    with apply_routing(model, cfg) as router, torch.no_grad():
        model(**inputs)
    return router.last_record


def _expected(ref, inputs, layer, queries_of) -> list[torch.Tensor]:
    """Per sample: the eager attention from its query positions to its visual tokens, mean over heads and
    queries."""
    rows = []
    vis_pos = visual_positions(inputs["input_ids"], IMAGE_TOKEN)
    for i, vis in enumerate(vis_pos):
        probs = ref.attentions[layer][i]  # (H, L, L)
        rows.append(probs[:, queries_of(i)][:, :, vis].mean(0).mean(0))
    return rows


def _max_error(record, expected) -> float:
    return max(float((record.stages[0].scores[i, : len(e)] - e).abs().max()) for i, e in enumerate(expected))


SCORERS = {
    "last_token_attention": lambda inputs: (lambda i: [inputs["input_ids"].shape[1] - 1]),
    "text_attention": lambda inputs: (lambda i: instruction_positions(inputs, IMAGE_TOKEN)[i]),
}


@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("scorer", list(SCORERS))
def test_attention_scorers_apply_the_q_and_k_norms(qwen3_llava, scorer, layer):
    model, _, inputs, ref = qwen3_llava
    expected = _expected(ref, inputs, layer, SCORERS[scorer](inputs))
    record = _scores(model, inputs, scorer, [Stage(layer, 0.5)])
    for i, e in enumerate(expected):
        torch.testing.assert_close(record.stages[0].scores[i, : len(e)], e, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("scorer", list(SCORERS))
def test_without_the_norms_the_scores_disagree(qwen3_llava, norms_skipped, scorer):
    model, _, inputs, ref = qwen3_llava
    expected = _expected(ref, inputs, 2, SCORERS[scorer](inputs))
    record = _scores(model, inputs, scorer, [Stage(2, 0.5)])
    assert _max_error(record, expected) > 1e-3  # the check above would fail (its tolerance: 1e-6 + 1e-4 rel)


def _captured_keys(monkeypatch):
    seen = {}
    original = redundancy_module.stage_keys

    def capture(ctx, key_mask=None):
        seen["keys"], seen["index"], seen["valid"] = out = original(ctx, key_mask)
        return out

    monkeypatch.setattr(redundancy_module, "stage_keys", capture)
    return seen


@pytest.mark.parametrize("layer", [0, 2])
def test_dart_pivots_use_the_normed_keys(qwen3_llava, monkeypatch, layer):
    model, eager, inputs, ref = qwen3_llava
    seen = _captured_keys(monkeypatch)
    record = _scores(model, inputs, "duplication", [Stage(layer, 0.5)], pivot_visual=2, pivot_text=2)
    cached = ref.past_key_values.layers[layer].keys  # (B, kv heads, L, hd): after k_norm and RoPE
    for b in range(cached.shape[0]):
        index = seen["index"][b][seen["valid"][b]]
        torch.testing.assert_close(seen["keys"][b][:, seen["valid"][b]], cached[b][:, index], atol=1e-5, rtol=1e-4)
    # and the selection is DART's, from those keys
    key_l1 = cached.abs().sum((1, 3))
    with torch.no_grad():
        states = eager.model.language_model.norm(ref.hidden_states[layer])
    vis_pos = visual_positions(inputs["input_ids"], IMAGE_TOKEN)
    for i, (vis, instr) in enumerate(zip(vis_pos, instruction_positions(inputs, IMAGE_TOKEN))):
        expected = dart_reference(key_l1[i], states[i], vis, instr, len(vis) // 2, 2, 2)
        assert record.stages[0].selected[i].tolist() == expected


def test_without_the_norms_dart_keys_disagree(qwen3_llava, monkeypatch, norms_skipped):
    model, _, inputs, ref = qwen3_llava
    seen = _captured_keys(monkeypatch)
    _scores(model, inputs, "duplication", [Stage(2, 0.5)])
    cached = ref.past_key_values.layers[2].keys
    index = seen["index"][0][seen["valid"][0]]
    assert (seen["keys"][0][:, seen["valid"][0]] - cached[0][:, index]).abs().max() > 1e-2


# ---- decoder inputs the engine does not know -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["deepstack_visual_embeds", "visual_pos_masks"])
def test_the_routed_decoder_refuses_decoder_inputs_it_does_not_know(fam, name):
    """As Qwen3-VL's model passes its text decoder `deepstack_visual_embeds` / `visual_pos_masks`: in the
    prefill and in a decode step, the routed decoder says which input it does not know."""
    model, inputs = fam.model, fam.batch(PROMPTS[:2])
    when = {"decoding": False}

    def inject(module, args, kwargs):
        past = kwargs.get("past_key_values")
        if (past is not None and past.get_seq_length() > 0) == when["decoding"]:
            kwargs[name] = [torch.zeros(1)]
        return args, kwargs

    hook = model.model.language_model.register_forward_pre_hook(inject, with_kwargs=True)
    cfg = RoutingConfig("prune", "random", [Stage(1, 0.5)])
    message = rf"does not know the decoder inputs \['{name}'\]"
    try:
        with apply_routing(model, cfg), torch.no_grad():
            with pytest.raises(ValueError, match=message):
                model(**inputs)
            when["decoding"] = True
            with pytest.raises(ValueError, match=message):
                model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    finally:
        hook.remove()
