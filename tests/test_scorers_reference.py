"""Each signal scorer against a slow, obviously correct reference computed from the unmodified model (eager
attention probabilities, the tower's own attention weights, hidden states, the K/V cache), for LLaVA and
Qwen2.5-VL on a padded batch of 2."""

import pytest
import torch
import torch.nn.functional as F

from conftest import PROMPTS
from oracle import (dart_reference, decoder_inputs, instruction_positions, masked_run, tiled_vision_reference,
                    visual_positions)
from visroute import RoutingConfig, Stage, apply_routing


def _routed(fam, scorer, stages, action="prune", **options):
    inputs = fam.batch(PROMPTS[:2])
    cfg = RoutingConfig(action=action, scorer=scorer, stages=stages, scorer_options=options)
    with apply_routing(fam.model, cfg) as router, torch.no_grad():
        fam.model(**inputs)
    return inputs, router.last_record


def _reference_states(fam, inputs):
    """hidden_states[l] (the input of decoder layer l) and the K/V cache of the unmodified eager model."""
    with torch.no_grad():
        out = fam.eager(**inputs, output_attentions=True, output_hidden_states=True, use_cache=True)
    return out


def _assert_scores(record, stage, expected_rows, atol=1e-6):
    for i, exp in enumerate(expected_rows):
        torch.testing.assert_close(record.stages[stage].scores[i, : len(exp)], exp.float(), atol=atol, rtol=1e-4)


# ---- text_attention -----------------------------------------------------------------------------------------
def _raters(embeds, vis, instr):
    """SparseVLM's raters, per sample: relevance = mean over visual of softmax over text of e_v . e_t."""
    relevance = torch.softmax(embeds[vis] @ embeds[instr].T, dim=1).mean(0)
    keep = relevance > relevance.mean()
    return instr[keep] if keep.any() else instr


@pytest.mark.parametrize("raters", [False, True])
@pytest.mark.parametrize("layer", [0, 2])
def test_text_attention_equals_eager_attention(fam, layer, raters):
    inputs, record = _routed(fam, "text_attention", [Stage(layer, 0.5)], raters=raters)
    ref = _reference_states(fam, inputs)
    embeds = decoder_inputs(fam.eager, inputs)[0]
    vis_pos = visual_positions(inputs["input_ids"], fam.image_token_id)
    instr_pos = instruction_positions(inputs, fam.image_token_id)
    expected, subset = [], False
    for i, (vis, instr) in enumerate(zip(vis_pos, instr_pos)):
        queries = _raters(embeds[i], vis, instr) if raters else instr
        subset |= len(queries) < len(instr)
        probs = ref.attentions[layer][i]  # (H, L, L)
        expected.append(probs[:, queries][:, :, vis].mean(0).mean(0))
    assert subset == raters  # the rater option really drops tokens in this batch
    _assert_scores(record, 0, expected)


def _oracle_states(fam, inputs, first_layer, active, upto, action="reroute"):
    """The states entering layer `upto` under the masking oracle of a one-stage schedule at `first_layer`, the
    rotary tables and the padding mask."""
    run = masked_run(fam.eager, inputs, fam.image_token_id, [(first_layer, active)], action)
    return run.hidden[upto], run.rotary, run.valid


def test_text_attention_under_reroute_scores_every_token_from_its_carried_state(fam):
    inputs, record = _routed(fam, "text_attention", [Stage(1, 0.5), Stage(3, 0.25)], action="reroute")
    h, rotary, valid = _oracle_states(fam, inputs, 1, record.stages[0].active, upto=3)
    layer = fam.eager.model.language_model.layers[3]
    length = h.shape[1]
    allowed = torch.tril(torch.ones(length, length, dtype=torch.bool))[None] & valid[:, None]  # every token a key
    mask = torch.zeros(h.shape[0], 1, length, length).masked_fill(~allowed[:, None], -1e30)
    with torch.no_grad():
        _, probs = layer.self_attn(layer.input_layernorm(h), attention_mask=mask, position_embeddings=rotary)
    vis_pos = visual_positions(inputs["input_ids"], fam.image_token_id)
    instr_pos = instruction_positions(inputs, fam.image_token_id)
    expected = [probs[i][:, instr][:, :, vis].mean(0).mean(0) for i, (vis, instr) in enumerate(zip(vis_pos, instr_pos))]
    _assert_scores(record, 1, expected, atol=1e-5)
    assert not record.stages[0].active[0, : len(vis_pos[0])].all()  # some scored tokens were inactive


# ---- similarity -----------------------------------------------------------------------------------------------
def _cosine_rows(states, vis_pos, text_pos, reduce):
    rows = []
    for i, (vis, text) in enumerate(zip(vis_pos, text_pos)):
        sim = F.cosine_similarity(states[i, vis][:, None, :], states[i, text][None, :, :], dim=-1)
        rows.append(sim.max(1).values if reduce == "max" else sim.mean(1))
    return rows


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_embedding_similarity_equals_cosine_of_input_embeddings(fam, reduce):
    inputs, record = _routed(fam, "embedding_similarity", [Stage(2, 0.5)], reduce=reduce)
    embeds = decoder_inputs(fam.eager, inputs)[0]
    vis_pos = visual_positions(inputs["input_ids"], fam.image_token_id)
    expected = _cosine_rows(embeds, vis_pos, instruction_positions(inputs, fam.image_token_id), reduce)
    _assert_scores(record, 0, expected, atol=1e-5)


@pytest.mark.parametrize("reduce, text_tokens", [("mean", "instruction"), ("max", "instruction"), ("mean", "last")])
def test_hidden_similarity_equals_cosine_of_layer_inputs(fam, reduce, text_tokens):
    inputs, record = _routed(fam, "hidden_similarity", [Stage(3, 0.5)], reduce=reduce, text_tokens=text_tokens)
    hidden = _reference_states(fam, inputs).hidden_states[3]
    vis_pos = visual_positions(inputs["input_ids"], fam.image_token_id)
    length = inputs["input_ids"].shape[1]
    if text_tokens == "last":
        text_pos = [torch.tensor([length - 1])] * len(vis_pos)
    else:
        text_pos = instruction_positions(inputs, fam.image_token_id)
    _assert_scores(record, 0, _cosine_rows(hidden, vis_pos, text_pos, reduce), atol=1e-5)


def test_hidden_similarity_under_reroute_uses_carried_states(fam):
    inputs, record = _routed(fam, "hidden_similarity", [Stage(1, 0.5), Stage(3, 0.25)], action="reroute")
    h, _, _ = _oracle_states(fam, inputs, 1, record.stages[0].active, upto=3)
    vis_pos = visual_positions(inputs["input_ids"], fam.image_token_id)
    expected = _cosine_rows(h, vis_pos, instruction_positions(inputs, fam.image_token_id), "mean")
    _assert_scores(record, 1, expected, atol=1e-5)


def test_hidden_similarity_at_layer_0_is_embedding_similarity(fam):
    _, a = _routed(fam, "hidden_similarity", [Stage(0, 0.5)], reduce="max")
    _, b = _routed(fam, "embedding_similarity", [Stage(0, 0.5)], reduce="max")
    torch.testing.assert_close(a.stages[0].scores, b.stages[0].scores)


# ---- vision_cls_attention -------------------------------------------------------------------------------------
def _per_sample(flat_per_image, record):
    """Concatenate per-image token scores into per-sample rows, images in batch order."""
    rows, it = [], iter(flat_per_image)
    for spans in record.images:
        rows.append(torch.cat([next(it) for _ in spans]))
    return rows


def _llava_cls_reference(model, inputs, layer):
    tower = model.model.vision_tower
    with torch.no_grad():
        out = tower(inputs["pixel_values"], output_attentions=True)
    return list(out.attentions[layer][:, :, 0, 1:].sum(1))  # [CLS] row without [CLS], summed over heads


def _qwen_received_reference(model, inputs, layer, monkeypatch):
    """Per image, per visual token: the mean attention each of its patches receives at `layer`, from the eager
    weights the tower computes for each attention segment, mapped to tokens by the tower's own ordering."""
    import sys

    tower = model.model.visual
    qmod = sys.modules[type(tower.blocks[layer].attn).__module__]  # Qwen2-VL or Qwen2.5-VL
    assert tower.config._attn_implementation == "eager"
    weights, inside = [], {"on": False}
    original = qmod.eager_attention_forward

    def recording(*args, **kwargs):
        out, w = original(*args, **kwargs)
        if inside["on"]:
            weights.append(w[0])  # (H, n, n) of one segment
        return out, w

    monkeypatch.setattr(qmod, "eager_attention_forward", recording)
    block = tower.blocks[layer].attn
    h1 = block.register_forward_pre_hook(lambda *a: inside.update(on=True))
    h2 = block.register_forward_hook(lambda *a: inside.update(on=False))
    grid = inputs["image_grid_thw"]
    try:
        with torch.no_grad():
            tower(inputs["pixel_values"], grid_thw=grid)
    finally:
        h1.remove()
        h2.remove()
    per_patch = torch.cat([w.sum(0).mean(0) for w in weights])  # in the order the blocks run
    # The merger sees merge units in that order; make it output each unit's index there and let the tower put
    # the units back in token order.
    monkeypatch.setattr(tower.merger, "forward", lambda x: torch.arange(x.shape[0] // 4, dtype=torch.float32)[:, None])
    with torch.no_grad():
        unit_of_token = tower(inputs["pixel_values"], grid_thw=grid).pooler_output[:, 0].long()
    per_token = per_patch.view(-1, 4).mean(1)[unit_of_token]
    sizes = [int(t * (h // 2) * (w // 2)) for t, h, w in grid.tolist()]
    return list(per_token.split(sizes))


@pytest.mark.parametrize("layer", [0, 1])
def test_vision_attention_equals_the_towers_eager_attention(any_fam, layer, monkeypatch):
    fam = any_fam
    # both tiny towers have 2 layers and feed the projector from the last: layer 1 is the default
    options = {} if layer == 1 else {"layer": layer}
    inputs, record = _routed(fam, "vision_cls_attention", [Stage(0, 0.5)], **options)
    ref = fam.eager
    if fam.row.tower == "clip":
        per_image = _llava_cls_reference(ref, inputs, layer)
    elif fam.row.tower == "tiles":  # one entry per span: each image's base tile, then its other tokens
        per_image = tiled_vision_reference(ref, inputs, layer)
    else:
        per_image = _qwen_received_reference(ref, inputs, layer, monkeypatch)
    _assert_scores(record, 0, _per_sample(per_image, record), atol=1e-5)


def test_vision_attention_under_generate_takes_the_towers_scores_before_the_prefill(any_fam):
    inputs = any_fam.batch(PROMPTS[:2])
    cfg = RoutingConfig(action="prune", scorer="vision_cls_attention", stages=[Stage(0, 0.5), Stage(2, 0.25)])
    with apply_routing(any_fam.model, cfg) as router, torch.no_grad():
        any_fam.model(**inputs)
        forward = router.last_record
        any_fam.model.generate(**inputs, max_new_tokens=2, do_sample=False)
        generated = router.last_record
    for a, b in zip(forward.stages, generated.stages):
        torch.testing.assert_close(a.scores, b.scores)


def test_qwen_windowed_block_scores_stay_within_windows():
    """In a windowed block each 2x2-unit window distributes its own attention: the tokens of a window score
    sum(heads) / merge = 4 / 4 = 1 together; in the full-attention block only the whole image sums to 1."""
    from conftest import family

    fam = family("qwen2.5")
    sums = {}
    for layer in (0, 1):
        _, record = _routed(fam, "vision_cls_attention", [Stage(0, 0.5)], layer=layer)
        grid = record.stages[0].scores[0, :16].view(2, 2, 2, 2)  # sample 0: a 4x4-token image, four windows
        sums[layer] = grid.permute(0, 2, 1, 3).reshape(4, 4).sum(1)
    torch.testing.assert_close(sums[0], torch.ones(4), atol=1e-5, rtol=0)
    assert float(sums[1].sum()) == pytest.approx(1.0, abs=1e-5)
    assert not torch.allclose(sums[1], torch.ones(4), atol=1e-3)


# ---- duplication (DART) ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer, pivots", [(0, (4, 4)), (2, (4, 4)), (2, (2, 1))])
def test_duplication_equals_dart(fam, layer, pivots):
    inputs, record = _routed(fam, "duplication", [Stage(layer, 0.5)], pivot_visual=pivots[0], pivot_text=pivots[1])
    ref = _reference_states(fam, inputs)
    keys = ref.past_key_values.layers[layer].keys  # (B, kv heads, L, hd), after RoPE: what DART reads
    key_l1 = keys.abs().sum((1, 3))
    with torch.no_grad():
        states = fam.eager.model.language_model.norm(ref.hidden_states[layer])
    vis_pos = visual_positions(inputs["input_ids"], fam.image_token_id)
    instr_pos = instruction_positions(inputs, fam.image_token_id)
    for i, (vis, instr) in enumerate(zip(vis_pos, instr_pos)):
        keep = len(vis) // 2
        expected = dart_reference(key_l1[i], states[i], vis, instr, keep, *pivots)
        assert record.stages[0].selected[i].tolist() == expected


# ---- diversity (DivPrune) -------------------------------------------------------------------------------------
def _divprune_reference(x, keep):
    """DivPrune on the full distance matrix: first the token whose nearest neighbour is farthest, then the
    token farthest from the picked set, never a token twice."""
    xn = x / x.norm(dim=1, keepdim=True)
    dist = 1.0 - xn @ xn.T
    picked = [int(torch.topk(dist, 2, dim=0, largest=False).values[1].argmax())]
    while len(picked) < keep:
        gain = dist[picked].min(0).values
        gain[picked] = -float("inf")
        picked.append(int(gain.argmax()))
    return sorted(picked)


@pytest.mark.parametrize("layer", [0, 2])
def test_diversity_equals_divprune(fam, layer):
    inputs, record = _routed(fam, "diversity", [Stage(layer, 0.25)])
    hidden = _reference_states(fam, inputs).hidden_states[layer]
    for i, vis in enumerate(visual_positions(inputs["input_ids"], fam.image_token_id)):
        expected = _divprune_reference(hidden[i, vis].float(), len(vis) // 4)
        assert record.stages[0].selected[i].tolist() == expected


def test_diversity_after_an_earlier_prune_chooses_among_the_survivors(fam):
    inputs, record = _routed(fam, "diversity", [Stage(1, 0.5), Stage(3, 0.25)])
    first = record.stages[0].active
    h, _, _ = _oracle_states(fam, inputs, 1, first, upto=3, action="prune")
    for i, vis in enumerate(visual_positions(inputs["input_ids"], fam.image_token_id)):
        survivors = first[i, : len(vis)].nonzero().flatten()
        picks = _divprune_reference(h[i, vis[survivors]].float(), len(vis) // 4)
        assert record.stages[1].selected[i].tolist() == survivors[picks].tolist()
