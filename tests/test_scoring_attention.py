"""`last_token_attention` against the eager attention probabilities of the unmodified model (first stage) and
of the masking oracle (a later prune stage, where the dropped tokens are no longer keys)."""

import pytest
import torch

from oracle import eager_copy, masked_forward, visual_positions
from visroute import RoutingConfig, Stage, apply_routing


def _last_positions(inputs):
    mask = inputs["attention_mask"].bool()
    seq = torch.arange(mask.shape[1])
    return torch.where(mask, seq, -1).max(1).values


def _expected(probs, inputs, image_token_id):
    """Mean over heads of the last prompt token's attention row, at each sample's visual tokens (B, Nv)."""
    last = _last_positions(inputs)
    rows = []
    for i, pos in enumerate(visual_positions(inputs["input_ids"], image_token_id)):
        rows.append(probs[i, :, last[i], pos].mean(0))
    return rows


@pytest.mark.parametrize("layer", [0, 2])
def test_first_stage_scores_equal_eager_attention(fam, layer):
    model, inputs = fam.model, fam.batch()
    ref = eager_copy(model, fam.build)
    with torch.no_grad():
        attn = ref(**inputs, output_attentions=True).attentions[layer]
    cfg = RoutingConfig(action="prune", scorer="last_token_attention", stages=[Stage(layer, 0.5)])
    with apply_routing(model, cfg) as router, torch.no_grad():
        model(**inputs)
    scores = router.last_record.stages[0].scores
    for i, exp in enumerate(_expected(attn, inputs, fam.image_token_id)):
        torch.testing.assert_close(scores[i, : len(exp)], exp, atol=1e-6, rtol=1e-4)
        # the selection is the top half by that score
        top = torch.sort(exp, descending=True, stable=True).indices[: len(exp) // 2].sort().values
        assert torch.equal(router.last_record.stages[0].selected[i], top)


def test_later_prune_stage_scores_equal_oracle_attention(fam):
    model, inputs = fam.model, fam.batch()
    cfg = RoutingConfig(action="prune", scorer="last_token_attention", stages=[Stage(1, 0.5), Stage(3, 0.25)])
    with apply_routing(model, cfg) as router, torch.no_grad():
        model(**inputs)
    rec = router.last_record
    ref = eager_copy(model, fam.build)
    _, attn = masked_forward(ref, inputs, fam.image_token_id, [(rec.stages[0].layer, rec.stages[0].active)],
                             "prune", capture_attn_layer=3)
    for i, exp in enumerate(_expected(attn, inputs, fam.image_token_id)):
        active = rec.stages[0].active[i, : len(exp)]
        torch.testing.assert_close(rec.stages[1].scores[i, : len(exp)][active], exp[active], atol=1e-6, rtol=1e-4)
