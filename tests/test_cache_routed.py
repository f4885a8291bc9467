"""The preallocated routed K/V cache: every way `generate` or a caller gets one (generate's default, a static cache
by name or passed in, a plain forward that then grows), each decode step checked against the eager masking
oracle over prompt + generated tokens; beam search, returned sequences and the batch operations on it; and the
clear errors for what a routed cache cannot do."""

import contextlib

import pytest
import torch
from transformers import Cache, DynamicCache, StaticCache
from transformers.cache_utils import Fp8QuantizedLayer

from conftest import family
from oracle import masked_run, with_generated
from test_semantics import NO_SPECIAL, decoder_positions, oracle_stages
from visroute import RoutingConfig, Stage, apply_routing

ACTIONS = ["prune", "reroute"]
STEPS = 9
KINDS = ["dynamic", "static", "user-static"]
EXTRA = 3  # a user's static cache larger than the generation needs


def config(action):
    return RoutingConfig(action=action, scorer="last_token_attention", stages=[Stage(1, 0.5), Stage(3, 0.25)])


@contextlib.contextmanager
def buffer_addresses(model):
    """Collects, at every decode step, each layer's key buffer (address, capacity) as the decoder receives it."""
    seen = []

    def look(module, args, kwargs):
        cache = kwargs.get("past_key_values")
        if cache is not None and cache.get_seq_length() > 0:
            seen.append([(layer.keys.data_ptr(), layer.keys.shape[2]) for layer in cache.layers])

    hook = model.model.language_model.register_forward_pre_hook(look, with_kwargs=True)
    try:
        yield seen
    finally:
        hook.remove()


def cache_kwargs(kind, model, inputs, steps=STEPS):
    if kind == "static":
        return {"cache_implementation": "static"}
    if kind == "user-static":
        return {"past_key_values": StaticCache(config=model.config,
                                               max_cache_len=inputs["input_ids"].shape[1] + steps + EXTRA)}
    return {}


def generate(model, inputs, cfg, steps=STEPS, **kw):
    with apply_routing(model, cfg) as router, decoder_positions(model) as positions, \
            buffer_addresses(model) as buffers, torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, suppress_tokens=NO_SPECIAL,
                             return_dict_in_generate=True, output_logits=True, **{"do_sample": False, **kw})
    return gen, router.last_record, positions(), buffers


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("action", ACTIONS)
def test_generate_decodes_what_the_oracle_computes_from_a_preallocated_cache(fam, action, kind):
    """Rule 4 over 9 greedy steps on each kind of cache; the cache was allocated once at the prefill (prompt
    entries that ran in each layer + the room the generation needs) and filled in place."""
    model, inputs = fam.model, fam.batch()
    given = cache_kwargs(kind, model, inputs)
    gen, record, positions, buffers = generate(model, inputs, config(action), **given)
    length = inputs["input_ids"].shape[1]
    generated = gen.sequences[:, length:-1]
    run = masked_run(fam.eager, inputs, fam.image_token_id, oracle_stages(record), action, generated=generated,
                     position_ids=positions)
    assert len(gen.logits) == STEPS
    for t, step_logits in enumerate(gen.logits):
        torch.testing.assert_close(step_logits, run.logits[:, length - 1 + t], atol=5e-5, rtol=1e-4)
    # capacity per layer: the prompt tokens present in that layer (the oracle's masks) + the room
    room = STEPS + EXTRA if kind == "user-static" else STEPS - 1
    prompt_entries = [int(run.present[li][:, :length].sum(1).max()) for li in range(len(buffers[0]))]
    assert [cap for _, cap in buffers[0]] == [n + room for n in prompt_entries]
    assert prompt_entries[-1] < prompt_entries[0]
    assert len(buffers) == STEPS - 1 and all(step == buffers[0] for step in buffers)  # never reallocated
    if kind == "user-static":
        assert gen.past_key_values is given["past_key_values"]  # the caller's cache object, filled in place
    assert gen.past_key_values.get_seq_length() == length + STEPS - 1


@pytest.mark.parametrize("action", ACTIONS)
def test_static_cache_generate_equals_dynamic_cache_generate(any_fam, action):
    model, inputs = any_fam.model, any_fam.batch()
    dynamic, _, _, _ = generate(model, inputs, config(action))
    for kind in ("static", "user-static"):
        static, _, _, _ = generate(model, inputs, config(action), **cache_kwargs(kind, model, inputs))
        assert torch.equal(static.sequences, dynamic.sequences)
        for a, b in zip(static.logits, dynamic.logits):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_static_routed_cache_keeps_its_layers_after_reset(fam):
    """A caller's static cache, reset, serves a second generation (another config) the same as a fresh one."""
    model, inputs = fam.model, fam.batch()
    cache = StaticCache(config=model.config, max_cache_len=inputs["input_ids"].shape[1] + STEPS + EXTRA)
    first, _, _, _ = generate(model, inputs, config("prune"), past_key_values=cache)
    cache.reset()
    assert cache.get_seq_length() == 0
    second, _, _, _ = generate(model, inputs, config("reroute"), past_key_values=cache)
    fresh, _, _, _ = generate(model, inputs, config("reroute"), **cache_kwargs("static", model, inputs))
    assert torch.equal(second.sequences, fresh.sequences)
    assert not torch.equal(first.sequences, second.sequences) or not all(
        torch.equal(a, b) for a, b in zip(first.logits, second.logits))


@pytest.mark.parametrize("action", ACTIONS)
def test_keep_all_static_generate_equals_the_unmodified_model(fam, action):
    """Rule 1 on a static cache: a keep-all schedule generates what the unrouted model generates."""
    model, inputs = fam.model, fam.batch()
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=6, do_sample=False, cache_implementation="static",
                             return_dict_in_generate=True, output_logits=True)
    cfg = RoutingConfig(action=action, scorer="last_token_attention", stages=[Stage(0, 1.0), Stage(3, 1.0)])
    with apply_routing(model, cfg), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, cache_implementation="static",
                             return_dict_in_generate=True, output_logits=True)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_text_only_static_generate_passes_through(fam):
    """Rule 6 on a static cache: no image, no routing; the static cache stays transformers' own."""
    model = fam.model
    ids = torch.tensor([[0, 0, 1, 5, 6, 7], [1, 8, 9, 10, 11, 12]])
    inputs = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=4, do_sample=False, cache_implementation="static")
    with apply_routing(model, config("prune")) as router, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, cache_implementation="static",
                             return_dict_in_generate=True)
        assert router.last_record is None
    assert torch.equal(out.sequences, ref)
    assert type(out.past_key_values) is StaticCache and out.past_key_values.is_compileable


def test_padded_batch_decodes_each_sample_as_alone_on_a_static_cache(fam):
    """Rule 5 through decoding: each sample of the padded batch generates, step by step, what it generates alone."""
    model, inputs = fam.model, fam.batch()
    batch, _, _, _ = generate(model, inputs, config("reroute"), steps=6, cache_implementation="static")
    length = inputs["input_ids"].shape[1]
    for i in range(3):
        alone_inputs = fam.single(i)
        alone, _, _, _ = generate(model, alone_inputs, config("reroute"), steps=6, cache_implementation="static")
        assert torch.equal(batch.sequences[i, length:], alone.sequences[0, alone_inputs["input_ids"].shape[1]:])
        for a, b in zip(batch.logits, alone.logits):
            torch.testing.assert_close(a[i], b[0], atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_beam_search_on_a_preallocated_cache_decodes_what_the_oracle_computes(fam, kind):
    """2 beams, 2 returned sequences per sample: generate reorders the preallocated cache in place every step;
    each returned sequence's step logits (from the beam that produced its token) equal the oracle's."""
    model, inputs = fam.model, fam.batch()
    beams, steps = 2, 8
    gen, record, positions, buffers = generate(model, inputs, config("reroute"), steps=steps, num_beams=beams,
                                               num_return_sequences=beams, **cache_kwargs(kind, model, inputs, steps))
    rows = [i for i in range(3) for _ in range(beams)]
    length = inputs["input_ids"].shape[1]
    assert any(not torch.equal(gen.sequences[j], gen.sequences[j + 1]) for j in range(0, len(rows), beams))
    run = masked_run(fam.eager, fam.select(inputs, rows), fam.image_token_id, oracle_stages(record), "reroute",
                     generated=gen.sequences[:, length:-1], position_ids=positions)
    for t in range(steps):
        produced = gen.logits[t][gen.beam_indices[:, t]]
        torch.testing.assert_close(produced, run.logits[:, length - 1 + t], atol=5e-5, rtol=1e-4)
    assert all(step == buffers[0] for step in buffers)  # reordered in place


def test_sampled_return_sequences_decode_what_the_oracle_computes(fam):
    """num_return_sequences=2 with sampling: generate expands the batch before the prefill; every returned
    sequence's step logits equal the oracle's over its own tokens."""
    model, inputs = fam.model, fam.batch()
    torch.manual_seed(0)
    gen, record, positions, _ = generate(model, inputs, config("prune"), steps=8, do_sample=True,
                                         num_return_sequences=2, temperature=2.0,
                                         **cache_kwargs("static", model, inputs, 8))
    rows = [0, 0, 1, 1, 2, 2]
    length = inputs["input_ids"].shape[1]
    assert gen.sequences.shape[0] == 6 and record.batch_size == 6
    assert any(not torch.equal(gen.sequences[j], gen.sequences[j + 1]) for j in (0, 2, 4))
    run = masked_run(fam.eager, fam.select(inputs, rows), fam.image_token_id, oracle_stages(record), "prune",
                     generated=gen.sequences[:, length:-1], position_ids=positions)
    for t, step_logits in enumerate(gen.logits):
        torch.testing.assert_close(step_logits, run.logits[:, length - 1 + t], atol=5e-5, rtol=1e-4)


# ---- a cache from a plain forward, decoded by hand --------------------------------------------------------------
def manual_decode(fam, model, inputs, cache, steps, first_logits, rows=None):
    """Greedy decode `steps` tokens by calling the model on `cache` (as a caller's own loop does); returns
    (generated tokens (B, steps), per-step logits, per-step key capacities)."""
    token = first_logits.argmax(-1, keepdim=True)
    tokens, logits, capacities = [token], [], []
    for _ in range(steps):
        full = with_generated(inputs, torch.cat(tokens, 1))
        position = (full["attention_mask"].cumsum(1) - 1)[:, -1:]  # (B, 1): as generate numbers a new token
        if fam.row.own_positions:  # Qwen's M-RoPE: text positions shifted by the prefill's rope deltas
            position = (position + model.model.rope_deltas)[None].expand(3, -1, -1)
        out = model(input_ids=token, attention_mask=full["attention_mask"], position_ids=position,
                    past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
        capacities.append(cache.layers[0].keys.shape[2])
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
    return torch.cat(tokens[:-1], 1), logits, capacities


def oracle_run(fam, inputs, record, action, generated):
    full = with_generated(inputs, generated)
    positions = fam.row.padded_positions(full).get("position_ids")
    return masked_run(fam.eager, inputs, fam.image_token_id, oracle_stages(record), action, generated=generated,
                      position_ids=positions)


@pytest.mark.parametrize("action", ACTIONS)
def test_a_cache_without_room_grows_and_decodes_what_the_oracle_computes(fam, action):
    """A plain forward allocates no decode room; decode calls beyond it grow every layer (16 entries, then
    doubling), and every step still equals the oracle."""
    model, inputs = fam.model, fam.batch()
    length = inputs["input_ids"].shape[1]
    with apply_routing(model, config(action)) as router, torch.no_grad():
        out = model(**inputs, use_cache=True, **fam.row.padded_positions(inputs))
        record, cache = router.last_record, out.past_key_values
        prompt_entries = cache.layers[0].keys.shape[2]
        assert prompt_entries == int(record.kv_tokens[0].max())  # no room yet
        generated, logits, capacities = manual_decode(fam, model, inputs, cache, 20, out.logits[:, -1])
    assert capacities == [prompt_entries + 16] * 16 + [prompt_entries + 32] * 4
    run_ref = oracle_run(fam, inputs, record, action, generated)
    for t, step_logits in enumerate(logits):
        torch.testing.assert_close(step_logits, run_ref.logits[:, length + t], atol=5e-5, rtol=1e-4)
    # each layer marks valid exactly its prompt entries that ran (the oracle's), then the 20 decoded, then room
    for li, valid in enumerate(cache.kv_valid):
        ran = run_ref.present[li][:, :length].sum(1)
        entries = int(ran.max())  # this layer's compact prompt entries
        assert valid.shape[1] == entries + 32
        for b in range(3):
            n = int(ran[b])
            assert valid[b].tolist() == [True] * n + [False] * (entries - n) + [True] * 20 + [False] * 12


@pytest.mark.parametrize("action", ACTIONS)
def test_a_decode_call_of_several_tokens_equals_the_oracle(fam, action):
    """A decode call may carry several new tokens (causal among themselves): 3 tokens, then 1, then 2."""
    model, inputs = fam.model, fam.batch()
    length = inputs["input_ids"].shape[1]
    new = torch.tensor([[7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18], [19, 20, 21, 22, 23, 24]])
    with apply_routing(model, config(action)) as router, torch.no_grad():
        out = model(**inputs, use_cache=True, **fam.row.padded_positions(inputs))
        record, cache = router.last_record, out.past_key_values
        logits, fed = [], 0
        for q in (3, 1, 2):
            full = with_generated(inputs, new[:, :fed + q])
            position = (full["attention_mask"].cumsum(1) - 1)[:, -q:]
            if fam.row.own_positions:
                position = (position + model.model.rope_deltas)[None].expand(3, -1, -1)
            logits.append(model(input_ids=new[:, fed:fed + q], attention_mask=full["attention_mask"],
                                position_ids=position, past_key_values=cache, use_cache=True).logits)
            fed += q
    ref = oracle_run(fam, inputs, record, action, new).logits
    torch.testing.assert_close(torch.cat(logits, 1), ref[:, length:], atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("operation", ["repeat_interleave", "select"])
def test_batch_operations_on_a_routed_cache(fam, operation):
    """`batch_repeat_interleave` / `batch_select_indices` on a routed prefill's cache: decoding the new batch
    equals the oracle over the corresponding rows of the prompt batch."""
    model, inputs = fam.model, fam.batch()
    rows = [0, 0, 1, 1, 2, 2] if operation == "repeat_interleave" else [2, 0]
    with apply_routing(model, config("reroute")) as router, torch.no_grad():
        out = model(**inputs, use_cache=True, **fam.row.padded_positions(inputs))
        record, cache = router.last_record, out.past_key_values
        if operation == "repeat_interleave":
            cache.batch_repeat_interleave(2)
        else:
            cache.batch_select_indices(torch.tensor(rows))
        picked = fam.select(inputs, rows)
        if fam.row.own_positions:  # Qwen keeps its prefill's rope deltas per row
            model.model.rope_deltas = model.model.rope_deltas[rows]
        generated, logits, _ = manual_decode(fam, model, picked, cache, 6, out.logits[rows, -1])
    assert [v.shape[0] for v in cache.kv_valid] == [len(rows)] * len(cache.layers)
    record.stages = [type(st)(**{**st.__dict__, "active": st.active[rows]}) for st in record.stages]
    ref = oracle_run(fam, picked, record, "reroute", generated).logits
    length = inputs["input_ids"].shape[1]
    for t, step_logits in enumerate(logits):
        torch.testing.assert_close(step_logits, ref[:, length + t], atol=5e-5, rtol=1e-4)


# ---- what a routed cache cannot do -----------------------------------------------------------------------------
@pytest.mark.parametrize("assist", ["prompt_lookup", "assistant_model"])
@pytest.mark.parametrize("batch", [1, 3])
def test_assisted_decoding_is_a_clear_error(fam, assist, batch):
    model = fam.model
    inputs = fam.batch() if batch == 3 else fam.single(0)
    kw = {"prompt_lookup_num_tokens": 2} if assist == "prompt_lookup" else {"assistant_model": fam.eager}
    with apply_routing(model, config("prune")), torch.no_grad(), \
            pytest.raises(ValueError, match=r"Assisted / speculative decoding .* cannot be cropped"):
        model.generate(**inputs, max_new_tokens=4, do_sample=False, **kw)


def test_a_routed_cache_refuses_crop(fam):
    with apply_routing(fam.model, config("prune")), torch.no_grad():
        cache = fam.model(**fam.batch(), use_cache=True).past_key_values
    assert not cache.is_croppable
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(-1)


@pytest.mark.parametrize("implementation", ["quantized", "offloaded", "offloaded_static"])
def test_cache_implementations_routing_cannot_fill_are_named(fam, implementation):
    with apply_routing(fam.model, config("prune")), torch.no_grad(), \
            pytest.raises(ValueError, match=f"cache_implementation='{implementation}' is not supported under routing"):
        fam.model.generate(**fam.batch(), max_new_tokens=3, cache_implementation=implementation)


def test_caches_routing_cannot_fill_are_named(fam):
    model, inputs = fam.model, fam.batch()
    n = len(model.model.language_model.layers)
    quantized = Cache(layers=[Fp8QuantizedLayer() for _ in range(n)])
    with apply_routing(model, config("prune")), torch.no_grad():
        with pytest.raises(ValueError, match="cannot fill a Cache with Fp8QuantizedLayer layers"):
            model.generate(**inputs, max_new_tokens=3, past_key_values=quantized)
        with pytest.raises(ValueError, match="cannot fill a Cache with Fp8QuantizedLayer layers"):
            model(**inputs, past_key_values=quantized)
        with pytest.raises(ValueError, match="cannot fill an offloaded DynamicCache"):
            model(**inputs, past_key_values=DynamicCache(offloading=True))


def test_a_static_cache_too_small_is_a_clear_error(fam):
    model, inputs = fam.model, fam.batch()
    length = inputs["input_ids"].shape[1]
    with apply_routing(model, config("prune")), torch.no_grad():
        with pytest.raises(ValueError, match=f"holds {length - 1} tokens .* fewer than the {length}-token prompt"):
            model(**inputs, past_key_values=StaticCache(config=model.config, max_cache_len=length - 1))
        cache = StaticCache(config=model.config, max_cache_len=length + 1)
        out = model(**inputs, past_key_values=cache, use_cache=True, **fam.row.padded_positions(inputs))
        with pytest.raises(ValueError, match=f"static cache is full: it holds {length + 1} tokens"):
            manual_decode(fam, model, inputs, cache, 3, out.logits[:, -1])


def test_a_4d_mask_other_than_generates_causal_padding_mask_is_refused():
    """With a static cache routing reads the prompt's padding back from the 4-D causal padding mask generate
    builds for it; any other 4-D mask (one query blind to a real token, or one seeing ahead) is refused instead
    of being misread."""
    fam = family("llava")
    model, inputs = fam.model, fam.batch()
    length = inputs["input_ids"].shape[1]
    width = length + 4
    valid = torch.cat([inputs["attention_mask"].bool(), torch.zeros(3, 4, dtype=torch.bool)], 1)
    mask = (torch.ones(length, width, dtype=torch.bool).tril()[None] & valid[:, None, :])[:, None]  # (B, 1, L, K)
    packed = mask.clone()  # the last query may not see an earlier real token that the others see
    packed[:, :, -1, length - 3] = False
    lookahead = mask.clone()  # a query sees the token after it
    lookahead[:, :, length - 3, length - 2] = True
    with apply_routing(model, config("prune")), torch.no_grad():
        plain = model(**inputs).logits
        given = model(**{**inputs, "attention_mask": mask}, past_key_values=StaticCache(config=model.config,
                                                                                          max_cache_len=width))
        for bad in (packed, lookahead):
            with pytest.raises(ValueError, match="2-D padding attention mask"):
                model(**{**inputs, "attention_mask": bad},
                      past_key_values=StaticCache(config=model.config, max_cache_len=width))
        with pytest.raises(ValueError, match="2-D padding attention mask"):  # a 4-D mask without a static cache
            model(**{**inputs, "attention_mask": mask[..., :length]})
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(given.logits[real], plain[real])
