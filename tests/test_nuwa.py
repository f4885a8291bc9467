"""Nüwa against slow references written from the formulas (docstring of visroute.scoring.nuwa): stage 1's
regional selection and the aggregation from the eager towers (`output_attentions`, `output_hidden_states`, explicit
loops over regions, tokens and neighbours), stage 2 from the eager decoder's attention at the earlier scoring
layer, and the six semantic rules with the merge, whose oracle is the unmodified model fed the merged embeddings."""

from __future__ import annotations

import contextlib
import math
import sys
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from oracle import decoder_inputs, eager_copy, masked_run, text_positions, visual_positions
from tiny import IMAGE_TOKEN, QWEN_IMAGE, VOCAB, llava_batch, qwen_batch, tiny_llava, tiny_qwen
from visroute import RoutingConfig, Stage, apply_routing

PROMPTS = [[1, 5, 6, 7, 8], [1, 9, 10], [1, 11, 12, 13, 14, 15]]
QWEN_GRIDS = [[(6, 10)], [(4, 8), (8, 12)], [(8, 8)]]  # merged grids 3x5 (odd), 2x4 + 4x6, 4x4
KEEP1, TOP_N, KEEP2 = 9, 2, 4


class Case:
    """A tiny model with an eager twin and a padded batch of 3 prompts (sample 1 holds two images)."""

    def __init__(self, name: str):
        self.name = name
        if name == "llava":
            build = lambda attn="sdpa": tiny_llava(attn=attn, image_size=40)  # 5 x 5 patches: partial regions
            self.model = build()
            self.inputs = llava_batch(self.model, PROMPTS, [1, 2, 1])
            self.token = IMAGE_TOKEN
            side = 5
            self.grids = [[(side, side)], [(side, side), (side, side)], [(side, side)]]
        else:
            build = lambda attn="sdpa": tiny_qwen("2.5", attn=attn)
            self.model = build()
            self.inputs = qwen_batch(self.model, PROMPTS, QWEN_GRIDS)
            self.token = QWEN_IMAGE
            self.grids = [[(h // 2, w // 2) for h, w in sample] for sample in QWEN_GRIDS]
        self.eager = eager_copy(self.model, build)


_CASES: dict[str, Case] = {}


def _case(name: str) -> Case:
    if name not in _CASES:
        _CASES[name] = Case(name)
    return _CASES[name]


@pytest.fixture(params=["llava", "qwen2.5"])
def case(request) -> Case:
    return _case(request.param)


def routed(case: Case, cfg: RoutingConfig, inputs=None, **kw):
    with apply_routing(case.model, cfg) as router, torch.no_grad():
        out = case.model(**(inputs or case.inputs), **kw)
    return out.logits, router.last_record


# ---- the released formulas, slowly ---------------------------------------------------------------------------------
def _qwen_unit_of_token(tower, inputs, monkeypatch) -> torch.Tensor:
    """For each visual token (token order), the index of its merge unit in the order the ViT blocks run."""
    grid = inputs["image_grid_thw"]
    with monkeypatch.context() as m, torch.no_grad():
        m.setattr(tower.merger, "forward", lambda x: torch.arange(x.shape[0] // 4, dtype=torch.float32)[:, None])
        return tower(inputs["pixel_values"], grid_thw=grid).pooler_output[:, 0].long()


def tower_facts(case: Case, feature_layers: tuple[int, int], monkeypatch):
    """Per image, in batch order: (scores, X, F). LLaVA: s = the [CLS] row of the last layer's eager attention
    summed over heads, X = the projector's input, F = the mean of the outputs of tower layers a..b. Qwen: s =
    attention received at the last block, mean over heads and summed over queries (the released formula), then
    averaged over each 2x2 unit; X = the decoder input embeddings; F = the merger applied to the mean of block
    outputs a..b; both put in token order."""
    ref, inputs = case.eager, case.inputs
    a, b = feature_layers
    if case.name == "llava":
        with torch.no_grad():
            out = ref.model.vision_tower(inputs["pixel_values"], output_hidden_states=True, output_attentions=True)
        scores = out.attentions[-1][:, :, 0, 1:].sum(1)
        x = out.hidden_states[ref.config.vision_feature_layer][:, 1:]
        feats = torch.stack(out.hidden_states[a + 1 : b + 2]).mean(0)[:, 1:]
        return list(scores), list(x), list(feats)
    tower = ref.model.visual
    qmod = sys.modules[type(tower.blocks[-1].attn).__module__]
    weights, outputs, inside = [], {}, {"on": False}
    original = qmod.eager_attention_forward

    def recording(*args, **kwargs):
        out, w = original(*args, **kwargs)
        if inside["on"]:
            weights.append(w[0])  # (H, n, n): one image
        return out, w

    hooks = [tower.blocks[-1].attn.register_forward_pre_hook(lambda *_: inside.update(on=True)),
             tower.blocks[-1].attn.register_forward_hook(lambda *_: inside.update(on=False))]
    for i in range(a, b + 1):
        hooks.append(tower.blocks[i].register_forward_hook(lambda mod, args, out, i=i: outputs.update({i: out})))
    grid = inputs["image_grid_thw"]
    with monkeypatch.context() as m, torch.no_grad():
        m.setattr(qmod, "eager_attention_forward", recording)
        tower(inputs["pixel_values"], grid_thw=grid)
    for h in hooks:
        h.remove()
    unit = _qwen_unit_of_token(tower, inputs, monkeypatch)
    received = torch.cat([w.mean(0).sum(0) for w in weights]).view(-1, 4).mean(1)[unit]
    with torch.no_grad():
        feats = tower.merger(torch.stack([outputs[i] for i in range(a, b + 1)]).mean(0))[unit]
    embeds = decoder_inputs(ref, inputs)[0]
    x = torch.cat([embeds[i, p] for i, p in enumerate(visual_positions(inputs["input_ids"], case.token))])
    sizes = [r * c for sample in case.grids for r, c in sample]
    return list(received.split(sizes)), list(x.split(sizes)), list(feats.split(sizes))


def split_budget(total: int, counts: list[int]) -> list[int]:
    """Largest remainder, ties to the earlier image, with exact fractions."""
    shares = [Fraction(total * c, sum(counts)) for c in counts]
    base = [math.floor(s) for s in shares]
    for i in sorted(range(len(counts)), key=lambda i: (-(shares[i] - base[i]), i))[: total - sum(base)]:
        base[i] += 1
    return base


def slow_selection(scores: list[torch.Tensor], grids, keep: int, top_n: int) -> list[list[int]]:
    """Per sample, the kept visual-token indices: each 2x2 region offers its top_n, each image keeps the best
    offered of its share; slots an image cannot fill go to the sample's best other tokens."""
    out, it = [], iter(scores)
    for sample in grids:
        images = [next(it) for _ in sample]
        shares = split_budget(keep, [r * c for r, c in sample])
        kept, offset, flat = [], 0, []
        for s, (rows, cols), share in zip(images, sample, shares):
            offered = []
            for r0 in range(0, rows, 2):
                for c0 in range(0, cols, 2):
                    block = [r * cols + c for r in range(r0, min(r0 + 2, rows)) for c in range(c0, min(c0 + 2, cols))]
                    offered += sorted(block, key=lambda t: (-float(s[t]), t))[:top_n]
            kept += [offset + t for t in sorted(offered, key=lambda t: (-float(s[t]), t))[:share]]
            flat += [(float(v), offset + t) for t, v in enumerate(s)]
            offset += rows * cols
        rest = sorted((t for t in flat if t[1] not in kept), key=lambda vt: (-vt[0], vt[1]))
        kept += [t for _, t in rest[: keep - len(kept)]]
        out.append(sorted(kept))
    return out


def slow_aggregate(s, x, feats, rows, cols, kept: list[int], variant: str, distance=None, quantile=None,
                   fraction=None):
    """Nüwa's aggregation of one image, a token and a neighbour at a time."""
    if variant == "llava":
        radius, q, self_one = math.sqrt(distance or 280.0), quantile or 0.55, True
    else:
        pr, pc = rows + rows % 2, cols + cols % 2
        radius = (fraction or 0.8) * math.sqrt((pr - 1) ** 2 + (pc - 1) ** 2) or 1.0
        q, self_one = quantile or 0.1, False
    tau = torch.quantile(s[kept].float(), q)
    merged = {}
    for i in kept:
        if s[i] >= tau:
            merged[i] = x[i].clone() if self_one else x[i] * (_weight(feats, i, i, cols, radius) /
                                                              (_weight(feats, i, i, cols, radius) + 1e-8))
            continue
        w = [_weight(feats, i, j, cols, radius) for j in range(rows * cols)]
        total = sum(w) + 1e-8
        acc = torch.zeros_like(x[i])
        for j, wj in enumerate(w):
            acc += (1.0 if (self_one and j == i) else wj / total) * x[j]
        merged[i] = acc
    return merged


def _weight(feats, i, j, cols, radius) -> float:
    d = math.dist(divmod(i, cols), divmod(j, cols))
    cos = float(F.cosine_similarity(feats[i], feats[j], dim=0))
    return max(cos, 0.0) * max(0.0, 1.0 - min(d / radius, 1.0))


def slow_merged_embeddings(case: Case, kept: list[list[int]], facts, **constants) -> torch.Tensor:
    """The decoder input embeddings with each kept visual token replaced by its aggregated feature (LLaVA: in the
    tower's space, then through the projector); the others keep their own."""
    variant = "llava" if case.name == "llava" else "qwen"
    embeds = decoder_inputs(case.eager, case.inputs)[0].clone()
    scores, xs, feats = facts
    it = iter(range(len(scores)))
    for b, (sample, positions) in enumerate(zip(case.grids, visual_positions(case.inputs["input_ids"], case.token))):
        offset = 0
        for rows, cols in sample:
            i = next(it)
            n = rows * cols
            mine = [t - offset for t in kept[b] if offset <= t < offset + n]
            merged = slow_aggregate(scores[i], xs[i], feats[i], rows, cols, mine, variant, **constants) if mine else {}
            for t, v in merged.items():
                with torch.no_grad():
                    row = case.eager.model.multi_modal_projector(v[None])[0] if variant == "llava" else v
                embeds[b, positions[offset + t]] = row
            offset += n
    return embeds


@contextlib.contextmanager
def fed(model, embeds: torch.Tensor, positions: list[torch.Tensor]):
    """The unmodified model's decoder fed `embeds` at the visual positions (longer inputs keep their own tail)."""
    def hook(module, args, kwargs):
        e = kwargs["inputs_embeds"].clone()
        for b, p in enumerate(positions):
            e[b, p] = embeds[b, p].to(e.dtype)
        kwargs["inputs_embeds"] = e
        return args, kwargs

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def layer0_inputs(case: Case, cfg: RoutingConfig) -> tuple[list[torch.Tensor], object]:
    """Per sample, the rows the routed model's first decoder layer receives at its visual tokens (compact
    sequence: text and kept visual tokens in order), and the record."""
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("h", args[0] if args else kwargs["hidden_states"])

    hook = case.model.model.language_model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        _, rec = routed(case, cfg)
    finally:
        hook.remove()
    rows = []
    valid = case.inputs["attention_mask"].bool()
    for b, positions in enumerate(visual_positions(case.inputs["input_ids"], case.token)):
        kept = set(positions[rec.stages[0].selected[b]].tolist())
        present = [p for p in range(valid.shape[1]) if valid[b, p] and (p in kept or p not in set(positions.tolist()))]
        rows.append(torch.stack([seen["h"][b, present.index(p)] for p in sorted(kept)]))
    return rows, rec


def nuwa_stage(keep=KEEP1, top_n=TOP_N, **merge_options) -> Stage:
    return Stage(0, keep, scorer="nuwa", scorer_options={"top_n": top_n}, merge="nuwa", merge_options=merge_options)


def features_of(case: Case) -> tuple[int, int]:
    """The default feature layers on the 2-layer tiny towers: LLaVA's 15..23 of 24 and Qwen's 7..23 of 32, scaled
    (round(f x 2)): LLaVA averages layer 1 alone, Qwen layers 0 and 1."""
    return (1, 1) if case.name == "llava" else (0, 1)


# ---- stage 1 and the aggregation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("action", ["prune", "reroute"])
def test_stage1_selection_equals_the_regional_rule_on_eager_tower_attention(case, action, monkeypatch):
    _, rec = routed(case, RoutingConfig(action, "last_token_attention", [nuwa_stage()]))
    scores, _, _ = tower_facts(case, features_of(case), monkeypatch)
    expected = slow_selection(scores, case.grids, KEEP1, TOP_N)
    assert [s.tolist() for s in rec.stages[0].selected] == expected
    plain = slow_selection(scores, case.grids, KEEP1, 4)  # no regional rule: the plain top of each image
    assert plain != expected  # the regional rule changes what is kept here, so the comparison can fail


@pytest.mark.parametrize("constants", [{}, {"distance": 4.0, "pillar_quantile": 0.5}])
def test_aggregation_equals_the_formulas(case, constants, monkeypatch):
    options = dict(constants)
    if case.name == "llava":
        options.update(features_from=0, features_to=1)
    elif "distance" in options:  # the Qwen variant's radius is a fraction of the diagonal
        options = {"radius_fraction": 0.3, "pillar_quantile": 0.5}
    rows, rec = layer0_inputs(case, RoutingConfig("prune", "last_token_attention", [nuwa_stage(**options)]))
    kept = [s.tolist() for s in rec.stages[0].selected]
    facts = tower_facts(case, (0, 1), monkeypatch)
    expected = slow_merged_embeddings(case, kept, facts, distance=options.get("distance"),
                                      quantile=options.get("pillar_quantile"), fraction=options.get("radius_fraction"))
    raw = decoder_inputs(case.eager, case.inputs)[0]
    changed = False
    for b, positions in enumerate(visual_positions(case.inputs["input_ids"], case.token)):
        want = expected[b, positions[kept[b]]]
        torch.testing.assert_close(rows[b], want, atol=2e-5, rtol=1e-4)
        changed |= bool((want - raw[b, positions[kept[b]]]).abs().max() > 1e-3)
    assert changed  # collectors really aggregated


def test_the_llava_merge_happens_before_the_projector(monkeypatch):
    """The same weights applied to the projected embeddings (the projector is not linear) give other features:
    the engine's are the merged tower features, projected."""
    case = _case("llava")
    rows, rec = layer0_inputs(case, RoutingConfig("prune", "last_token_attention",
                                                  [nuwa_stage(features_from=0, features_to=1)]))
    kept = rec.stages[0].selected[0].tolist()  # sample 0: one image
    scores, xs, feats = tower_facts(case, (0, 1), monkeypatch)
    project = case.eager.model.multi_modal_projector
    with torch.no_grad():
        projected = project(xs[0])
        before = {t: project(v[None])[0] for t, v in slow_aggregate(scores[0], xs[0], feats[0], 5, 5, kept,
                                                                     "llava").items()}
    after = slow_aggregate(scores[0], projected, feats[0], 5, 5, kept, "llava")
    collectors = [t for t in kept if (after[t] - projected[t]).abs().max() > 1e-4]
    assert collectors
    for t in collectors:
        torch.testing.assert_close(rows[0][kept.index(t)], before[t], atol=2e-5, rtol=1e-4)
        assert (rows[0][kept.index(t)] - after[t]).abs().max() > 1e-4


# ---- stage 2 ----------------------------------------------------------------------------------------------------
def two_stage(case: Case, action="prune") -> RoutingConfig:
    options = {} if case.name == "llava" else {"queries": 3, "heads": "max"}
    return RoutingConfig(action, "last_token_attention", [nuwa_stage(), Stage(4, KEEP2, score_layer=3)],
                         scorer_options=options)


def eager_stage2(case: Case, embeds, first, layer: int, queries: int, heads: str, candidates) -> list[list[int]]:
    positions = visual_positions(case.inputs["input_ids"], case.token)
    with fed(case.eager, embeds, positions):
        run = masked_run(case.eager, case.inputs, case.token, [(0, first)], "prune", capture_attn_layer=layer)
    out = []
    for b, pos in enumerate(positions):
        rows = run.attention[b][:, -queries:][:, :, pos].mean(1)  # (H, Nv): the last `queries` prompt tokens
        row = rows.mean(0) if heads == "mean" else rows.amax(0)
        row = torch.where(candidates[b, : len(pos)], row, torch.tensor(float("-inf")))
        out.append(sorted(row.topk(KEEP2).indices.tolist()))
    return out


def test_stage2_equals_eager_attention_at_the_earlier_layer(case, monkeypatch):
    cfg = two_stage(case)
    logits, rec = routed(case, cfg)
    kept = [s.tolist() for s in rec.stages[0].selected]
    facts = tower_facts(case, features_of(case), monkeypatch)
    embeds = slow_merged_embeddings(case, kept, facts)
    first = rec.stages[0].active
    queries, heads = (1, "mean") if case.name == "llava" else (3, "max")
    at_3 = eager_stage2(case, embeds, first, 3, queries, heads, first)
    assert [s.tolist() for s in rec.stages[1].selected] == at_3
    at_4 = eager_stage2(case, embeds, first, 4, queries, heads, first)
    assert at_3 != at_4  # scoring at the stage's own layer would keep other tokens
    if heads == "max":  # and Qwen's reduction matters
        assert at_3 != eager_stage2(case, embeds, first, 3, 1, "mean", first)


# ---- the six rules with the merge ------------------------------------------------------------------------------
def merged_for(case: Case, rec, monkeypatch) -> torch.Tensor:
    kept = [s.tolist() for s in rec.stages[0].selected]
    return slow_merged_embeddings(case, kept, tower_facts(case, features_of(case), monkeypatch))


@pytest.mark.parametrize("action", ["prune", "reroute"])
def test_rule_1_keep_all_equals_the_model_fed_the_merged_embeddings(case, action, monkeypatch):
    cfg = RoutingConfig(action, "last_token_attention", [nuwa_stage(keep=10_000), Stage(2, 1.0), Stage(4, 10_000)])
    logits, rec = routed(case, cfg)
    assert torch.equal(rec.stages[0].kept, rec.num_visual)
    embeds = merged_for(case, rec, monkeypatch)
    with fed(case.model, embeds, visual_positions(case.inputs["input_ids"], case.token)), torch.no_grad():
        ref = case.model(**case.inputs).logits
    valid = case.inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[valid], ref[valid], atol=5e-5, rtol=1e-4)
    with torch.no_grad():
        plain = case.model(**case.inputs).logits
    assert (plain[valid] - logits[valid]).abs().max() > 1e-3  # the merge changed the answer


@pytest.mark.parametrize("action", ["prune", "reroute"])
def test_rules_2_and_3_routed_equals_the_masking_oracle_fed_the_merged_embeddings(case, action, monkeypatch):
    cfg = two_stage(case, action)
    logits, rec = routed(case, cfg)
    embeds = merged_for(case, rec, monkeypatch)
    stages = [(st.layer, st.active) for st in rec.stages]
    positions = visual_positions(case.inputs["input_ids"], case.token)
    with fed(case.eager, embeds, positions):
        ref = masked_run(case.eager, case.inputs, case.token, stages, action).logits
    plain = masked_run(case.eager, case.inputs, case.token, stages, action).logits
    text = text_positions(case.inputs, case.token)
    torch.testing.assert_close(logits[text], ref[text], atol=5e-5, rtol=1e-4)
    assert (plain[text] - logits[text]).abs().max() > 1e-3
    if action == "reroute":  # a token left out at layer 0 came back at layer 4, with its own embedding
        assert (rec.stages[1].active & ~rec.stages[0].active).any()


NO_SPECIAL = list(range(99, VOCAB))


@pytest.mark.parametrize("action", ["prune", "reroute"])
def test_rule_4_cached_decoding_equals_the_oracle_over_prompt_and_generated_tokens(case, action, monkeypatch):
    cfg = two_stage(case, action)
    calls = []
    hook = case.model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: calls.append(kw["position_ids"]), with_kwargs=True)
    steps = 5
    try:
        with apply_routing(case.model, cfg) as router, torch.no_grad():
            gen = case.model.generate(**case.inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                      suppress_tokens=NO_SPECIAL, return_dict_in_generate=True, output_logits=True)
            rec = router.last_record
    finally:
        hook.remove()
    length = case.inputs["input_ids"].shape[1]
    embeds = merged_for(case, rec, monkeypatch)
    positions = visual_positions(case.inputs["input_ids"], case.token)
    with fed(case.eager, embeds, positions):
        ref = masked_run(case.eager, case.inputs, case.token, [(st.layer, st.active) for st in rec.stages], action,
                         generated=gen.sequences[:, length:-1], position_ids=torch.cat(calls, -1)).logits
    for t, step in enumerate(gen.logits):
        torch.testing.assert_close(step, ref[:, length - 1 + t], atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("action", ["prune", "reroute"])
def test_rule_5_padded_batch_equals_each_sample_alone(case, action):
    cfg = two_stage(case, action)
    logits, rec = routed(case, cfg)
    text = text_positions(case.inputs, case.token)
    for i in range(3):
        alone = _alone(case, i)
        logits_i, rec_i = routed(case, cfg, inputs=alone)
        for st, st_i in zip(rec.stages, rec_i.stages):
            assert torch.equal(st.selected[i], st_i.selected[0])
        text_i = text_positions(alone, case.token)[0]
        torch.testing.assert_close(logits[i][text[i]], logits_i[0][text_i], atol=5e-5, rtol=1e-4)


def _alone(case: Case, i: int) -> dict:
    """Sample i of the batch alone (no padding), with its own images."""
    if case.name == "llava":
        counts = [1, 2, 1]
        alone = llava_batch(case.model, [PROMPTS[i]], [counts[i]])
        first = sum(counts[:i])
        alone["pixel_values"] = case.inputs["pixel_values"][first : first + counts[i]]
        return alone
    alone = qwen_batch(case.model, [PROMPTS[i]], [QWEN_GRIDS[i]])
    rows = [h * w for sample in QWEN_GRIDS for h, w in sample]
    first = sum(len(sample) for sample in QWEN_GRIDS[:i])
    start = sum(rows[:first])
    alone["pixel_values"] = case.inputs["pixel_values"][start : start + sum(rows[first : first + len(QWEN_GRIDS[i])])]
    return alone


@pytest.mark.parametrize("action", ["prune", "reroute"])
def test_rule_6_text_only_inputs_pass_through(case, action):
    ids = torch.tensor([[0, 0, 1, 5, 6, 7], [1, 8, 9, 10, 11, 12]])
    inputs = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    with torch.no_grad():
        ref = case.model(**inputs).logits
    out, rec = routed(case, two_stage(case, action), inputs=inputs)
    assert rec is None and torch.equal(out, ref)
