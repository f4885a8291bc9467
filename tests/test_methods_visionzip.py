"""The VisionZip method's scorer and merge against a slow reference written from VisionZip's released procedure
(dominant tokens by the eager tower's [CLS] attention, uniformly spaced contextual targets, every other token
joining its most similar target by the eager attention's keys averaged over heads, target + mean), and rule 2
with the merge: the unmodified model fed the merged embeddings."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F

from oracle import decoder_inputs, masked_run, text_positions, visual_positions
from test_nuwa import _case, _qwen_unit_of_token, fed, layer0_inputs, routed, split_budget
from visroute import RoutingConfig, Stage


@pytest.fixture(params=["llava", "qwen2.5"])
def case(request):
    return _case(request.param)


def eager_facts(case, monkeypatch):
    """Per image, in batch order: [CLS] attention (Qwen: attention received, sum over heads, mean over queries,
    per 2x2 unit), the features merged (LLaVA: the projector's input; Qwen: the decoder input embeddings) and
    the keys the attention used, averaged over heads (Qwen: and over each unit), all from the eager tower."""
    ref, inputs = case.eager, case.inputs
    if case.name == "llava":
        tower = ref.model.vision_tower
        layer = getattr(tower, "vision_model", tower).encoder.layers[-1].self_attn
        qmod = sys.modules[type(layer).__module__]
    else:
        tower = ref.model.visual
        layer = tower.blocks[-1].attn
        qmod = sys.modules[type(layer).__module__]
    keys, weights, inside = [], [], {"on": False}
    original = qmod.eager_attention_forward

    def recording(module, query, key, value, *args, **kwargs):
        out, w = original(module, query, key, value, *args, **kwargs)
        if inside["on"]:
            keys.append(key)
            weights.append(w)
        return out, w

    hooks = [layer.register_forward_pre_hook(lambda *_: inside.update(on=True)),
             layer.register_forward_hook(lambda *_: inside.update(on=False))]
    try:
        with monkeypatch.context() as m, torch.no_grad():
            m.setattr(qmod, "eager_attention_forward", recording)
            if case.name == "llava":
                out = tower(inputs["pixel_values"], output_hidden_states=True)
            else:
                tower(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    finally:
        for h in hooks:
            h.remove()
    if case.name == "llava":
        cls = weights[0][:, :, 0, 1:].sum(1)  # (images, patches)
        metric = keys[0].mean(1)[:, 1:]  # (images, patches, hd)
        x = out.hidden_states[ref.config.vision_feature_layer][:, 1:]
        return list(cls), list(x), list(metric)
    unit = _qwen_unit_of_token(tower, inputs, monkeypatch)
    received = torch.cat([w[0].sum(0).mean(0) for w in weights]).view(-1, 4).mean(1)[unit]
    metric = torch.cat([k[0].mean(0) for k in keys]).view(-1, 4, keys[0].shape[-1]).mean(1)[unit]
    embeds = decoder_inputs(ref, inputs)[0]
    x = torch.cat([embeds[i, p] for i, p in enumerate(visual_positions(inputs["input_ids"], case.token))])
    sizes = [r * c for sample in case.grids for r, c in sample]
    return list(received.split(sizes)), list(x.split(sizes)), list(metric.split(sizes))


def slow_visionzip(s, x, metric, keep: int, share: float):
    """One image: (kept indices, {kept index: its feature})."""
    n = len(s)
    c = math.floor(keep * share + 0.5)
    dominant = sorted(range(n), key=lambda t: (-float(s[t]), t))[: keep - c]
    remaining = [t for t in range(n) if t not in dominant]
    step = max(1, len(remaining) // c) if c else 1
    targets = remaining[::step][:c] if c else []
    members = {t: [] for t in targets}
    for t in remaining:
        if t in targets or not targets:  # without contextual tokens the rest is simply dropped
            continue
        sims = [float(F.cosine_similarity(metric[t], metric[g], dim=0)) for g in targets]
        members[targets[max(range(len(sims)), key=lambda i: (sims[i], -i))]].append(t)
    out = {t: x[t] for t in dominant}
    for g, joined in members.items():
        out[g] = x[g] + (torch.stack([x[t] for t in joined]).mean(0) if joined else 0)
    return sorted(out), out


@pytest.mark.parametrize("keep, share", [(12, None), (9, 0.4)])
def test_visionzip_selection_and_merge_equal_the_released_procedure(case, keep, share, monkeypatch):
    options = {} if share is None else {"contextual": share}
    stage = Stage(0, keep, scorer="visionzip", scorer_options=options, merge="visionzip", merge_options=options)
    rows, rec = layer0_inputs(case, RoutingConfig("prune", "last_token_attention", [stage]))
    cls, xs, metrics = eager_facts(case, monkeypatch)
    it = iter(range(len(cls)))
    raw = decoder_inputs(case.eager, case.inputs)[0]
    contextual = 0
    for b, (sample, positions) in enumerate(zip(case.grids, visual_positions(case.inputs["input_ids"], case.token))):
        kept, feats, offset = [], {}, 0
        for (r, c), k in zip(sample, split_budget(keep, [r * c for r, c in sample])):
            i = next(it)
            mine, merged = slow_visionzip(cls[i], xs[i], metrics[i], k, 10 / 64 if share is None else share)
            kept += [offset + t for t in mine]
            feats.update({offset + t: v for t, v in merged.items()})
            offset += r * c
        assert rec.stages[0].selected[b].tolist() == kept
        for j, t in enumerate(kept):
            want = feats[t]
            if case.name == "llava":
                with torch.no_grad():
                    want = case.eager.model.multi_modal_projector(want[None])[0]
            torch.testing.assert_close(rows[b][j], want, atol=2e-5, rtol=1e-4)
            contextual += int((want - raw[b, positions[t]]).abs().max() > 1e-3)
    assert contextual  # some tokens really were merged into


def test_visionzip_stage_equals_the_masking_oracle_fed_its_embeddings(case):
    stage = Stage(0, 9, scorer="visionzip", scorer_options={"contextual": 0.4}, merge="visionzip",
                  merge_options={"contextual": 0.4})
    cfg = RoutingConfig("prune", "last_token_attention", [stage, Stage(3, 4)])
    logits, rec = routed(case, cfg)
    rows, _ = layer0_inputs(case, cfg)
    positions = visual_positions(case.inputs["input_ids"], case.token)
    embeds = decoder_inputs(case.eager, case.inputs)[0].clone()
    for b, p in enumerate(positions):
        embeds[b, p[rec.stages[0].selected[b]]] = rows[b]
    with fed(case.eager, embeds, positions):
        ref = masked_run(case.eager, case.inputs, case.token, [(st.layer, st.active) for st in rec.stages],
                         "prune").logits
    text = text_positions(case.inputs, case.token)
    torch.testing.assert_close(logits[text], ref[text], atol=5e-5, rtol=1e-4)
