"""The public API: configs, apply/remove, generate across schedules, records, and clear errors for bad input."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import family
from oracle import masked_run
from visroute import RoutingConfig, Stage, apply_routing
from visroute.config import parse_stages


# ---- config --------------------------------------------------------------------------------------------------
def test_config_round_trips_dict_and_yaml(tmp_path):
    cfg = RoutingConfig(action="reroute", scorer="random", stages=[Stage(2, 0.5), Stage(7, 64)],
                        scorer_options={"seed": 3})
    assert RoutingConfig.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "cfg.yaml"
    cfg.to_yaml(path)
    back = RoutingConfig.from_yaml(path)
    assert back == cfg
    assert isinstance(back.stages[0].keep, float) and isinstance(back.stages[1].keep, int)


def test_parse_stages():
    assert parse_stages("2:0.5,7:64") == [Stage(2, 0.5), Stage(7, 64)]
    with pytest.raises(ValueError, match="layer:keep"):
        parse_stages("2-0.5")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(action="drop", scorer="random", stages=[Stage(1, 0.5)]), "Unknown action"),
        (dict(action="prune", scorer="nope", stages=[Stage(1, 0.5)]), "Unknown scorer 'nope'"),
        (dict(action="prune", scorer="random", stages=[Stage(3, 0.5), Stage(3, 0.2)]), "strictly increasing"),
        (dict(action="prune", scorer="random", stages=[Stage(3, 0.5), Stage(1, 0.2)]), "strictly increasing"),
        (dict(action="prune", scorer="random", stages=[Stage(1, 0.5)], scorer_options={"sed": 1}), "Unknown option"),
    ],
)
def test_bad_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cfg = RoutingConfig(**kwargs)
        apply_routing(family("llava").model, cfg).remove()


def test_negative_keep_and_bad_layer_are_refused():
    with pytest.raises(ValueError, match="keep must be >= 0"):
        Stage(1, -0.5)
    with pytest.raises(ValueError, match="layer must be >= 0"):
        Stage(-1, 0.5)
    cfg = RoutingConfig(action="prune", scorer="random", stages=[Stage(6, 0.5)])
    with pytest.raises(ValueError, match="outside the model's decoder layers 0..5"):
        apply_routing(family("llava").model, cfg)


def test_unsupported_model_names_the_supported_ones():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))
    cfg = RoutingConfig(action="prune", scorer="random", stages=[Stage(1, 0.5)])
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration.*Qwen2_5_VLForConditionalGeneration"):
        apply_routing(model, cfg)


def test_images_without_image_tokens_is_a_clear_error(fam):
    inputs = fam.batch()
    inputs["input_ids"] = inputs["input_ids"].masked_fill(inputs["input_ids"] == fam.image_token_id, 7)
    cfg = RoutingConfig(action="prune", scorer="random", stages=[Stage(1, 0.5)])
    with apply_routing(fam.model, cfg), pytest.raises(ValueError, match="processor does not match the model"):
        fam.model(**inputs)


# ---- apply / remove ------------------------------------------------------------------------------------------
def test_remove_restores_the_model_exactly(fam):
    model, inputs = fam.model, fam.batch()
    lm = model.model.language_model
    with torch.no_grad():
        before = model(**inputs).logits
    cfg = RoutingConfig(action="prune", scorer="last_token_attention", stages=[Stage(1, 0.25)])
    router = apply_routing(model, cfg)
    with pytest.raises(RuntimeError, match="already routed"):
        apply_routing(model, cfg)
    with torch.no_grad():
        routed = model(**inputs).logits
    router.remove()
    assert "forward" not in lm.__dict__ and not model._forward_pre_hooks
    with torch.no_grad():
        after = model(**inputs).logits
    assert not torch.allclose(routed, before)
    assert torch.equal(after, before)


def test_apply_routing_takes_a_dict_or_yaml(tmp_path):
    model = family("llava").model
    d = {"action": "prune", "scorer": "random", "stages": [{"layer": 1, "keep": 0.5}]}
    apply_routing(model, d).remove()
    RoutingConfig.from_dict(d).to_yaml(tmp_path / "c.yaml")
    with apply_routing(model, tmp_path / "c.yaml") as router:
        assert router.config.stages == [Stage(1, 0.5)]


# ---- generate and records ------------------------------------------------------------------------------------
SCHEDULES = [
    [Stage(0, 0.5)],
    [Stage(0, 0)],
    [Stage(2, 4)],
    [Stage(1, 0.5), Stage(3, 0.25), Stage(5, 0.1)],
    [Stage(0, 1.0), Stage(5, 0.0)],
]


def _expected_visual(stages, action, counts: list[int], num_layers: int) -> torch.Tensor:
    """(num_layers, B) visual tokens a schedule keeps active in each layer, worked out from its keeps alone."""
    out = torch.zeros(num_layers, len(counts), dtype=torch.long)
    for i, n in enumerate(counts):
        active, at = n, {st.layer: st.keep for st in stages}
        for li in range(num_layers):
            if li in at:
                keep = at[li] if isinstance(at[li], int) else int(at[li] * n)
                active = min(keep, active if action == "prune" else n)
            out[li, i] = active
    return out


@pytest.mark.parametrize("schedule", range(len(SCHEDULES)))
@pytest.mark.parametrize("action", ["prune", "reroute"])
def test_generate_works_for_every_schedule(any_fam, action, schedule):
    model, inputs = any_fam.model, any_fam.batch()
    cfg = RoutingConfig(action=action, scorer="last_token_attention", stages=SCHEDULES[schedule])
    steps = 4
    with apply_routing(model, cfg) as router, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             return_dict_in_generate=True)
    rec = router.last_record
    assert out.sequences.shape == (3, inputs["input_ids"].shape[1] + steps)
    nv = rec.num_visual
    assert nv.tolist() == inputs["input_ids"].eq(any_fam.image_token_id).sum(1).tolist()
    text = inputs["attention_mask"].sum(1) - nv
    for st in rec.stages:
        expect = torch.tensor([min(st.keep if isinstance(st.keep, int) else int(st.keep * n), n) for n in nv.tolist()])
        assert torch.equal(st.kept, expect)
        for i, sel in enumerate(st.selected):
            assert torch.equal(sel, sel.sort().values) and len(sel) == expect[i]
    # tokens that ran and K/V entries cached per layer, against counts worked out from the schedule alone; the
    # cache's key tensors are as much shorter in a layer as its longest sample's prompt entries are fewer (the
    # decoded tokens, and any room kept for them, are the same in every layer)
    visual = _expected_visual(SCHEDULES[schedule], action, nv.tolist(), rec.num_layers)
    assert torch.equal(rec.active_visual, visual)
    assert torch.equal(rec.active_tokens, text + visual)
    assert torch.equal(rec.kv_tokens, text + visual)
    keys = torch.tensor([layer.keys.shape[2] for layer in out.past_key_values.layers])
    longest = (text + visual).max(1).values
    assert torch.equal(keys - keys[0], longest - longest[0]) and keys[0] >= longest[0] + steps - 1


@pytest.mark.parametrize("action", ["prune", "reroute"])
def test_kv_cache_holds_the_oracle_keys_of_the_tokens_that_ran(fam, action):
    """Layer l of the routed cache holds, per sample and in sequence order, the keys and values the eager masking
    oracle computes in layer l for the tokens present there (text + that stage's active visual tokens; under
    reroute a token that re-enters has its carried state), then padding marked invalid."""
    model, inputs = fam.model, fam.batch()
    cfg = RoutingConfig(action=action, scorer="last_token_attention", stages=[Stage(2, 0.25), Stage(4, 0.5)])
    with apply_routing(model, cfg) as router, torch.no_grad():
        out = model(**inputs, use_cache=True)
    cache, rec = out.past_key_values, router.last_record
    decisions = [(st.layer, st.active) for st in rec.stages]
    run = masked_run(fam.eager, inputs, fam.image_token_id, decisions, action)
    if action == "reroute":
        assert (rec.stages[1].active & ~rec.stages[0].active).any()  # some token re-entered at layer 4
    for li, layer in enumerate(cache.layers):
        present = run.present[li]  # (B, L) from the decisions and the schedule alone
        assert layer.keys.shape[2] == int(present.sum(1).max())
        assert rec.kv_tokens[li].tolist() == present.sum(1).tolist()
        for b in range(present.shape[0]):
            where = present[b].nonzero().flatten()
            n = len(where)
            torch.testing.assert_close(layer.keys[b, :, :n], run.cache.layers[li].keys[b][:, where], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(layer.values[b, :, :n], run.cache.layers[li].values[b][:, where],
                                       atol=2e-5, rtol=1e-4)
            assert cache.kv_valid[li][b].tolist() == [True] * n + [False] * (layer.keys.shape[2] - n)
    assert cache.get_seq_length() == inputs["input_ids"].shape[1]
    # the comparison can fail: past the first stage, the unrouted model's keys are not the routed ones
    unrouted = masked_run(fam.eager, inputs, fam.image_token_id, [], action)
    where = run.present[5][0].nonzero().flatten()
    n = len(where)
    assert (cache.layers[5].keys[0, :, :n] - unrouted.cache.layers[5].keys[0][:, where]).abs().max() > 1e-3


def test_random_scorer_is_reproducible_and_seeded(fam):
    model, inputs = fam.model, fam.batch()

    def picks(seed):
        cfg = RoutingConfig(action="prune", scorer="random", stages=[Stage(1, 0.5)], scorer_options={"seed": seed})
        with apply_routing(model, cfg) as router, torch.no_grad():
            model(**inputs)
        return router.last_record.stages[0].selected

    a, b, c = picks(0), picks(0), picks(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
