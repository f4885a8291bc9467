"""Independent references for the routing semantics: the unmodified model run layer by layer over the full
sequence with eager attention and explicit L x L masks (slow and obviously correct)."""

from __future__ import annotations

import torch


def eager_copy(model, builder):
    """A second instance of the same weights with eager attention."""
    ref = builder(attn="eager")
    ref.load_state_dict(model.state_dict())
    return ref.eval()


def decoder_inputs(model, inputs):
    """What the unmodified model feeds its text decoder: (inputs_embeds, position_ids, attention_mask)."""
    lm = model.model.language_model
    seen = {}

    def grab(module, args, kwargs):
        seen.update(kwargs)

    h = lm.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        h.remove()
    return seen["inputs_embeds"], seen.get("position_ids"), seen.get("attention_mask")


def visual_positions(input_ids, token_id):
    """Per sample, the sequence positions of its visual tokens."""
    return [row.eq(token_id).nonzero().flatten() for row in input_ids]


def masked_forward(model, inputs, image_token_id, stages, action, capture_attn_layer=None):
    """The masking oracle of DESIGN.md rules 2 and 3.

    stages: list of (layer, active) with active a (B, Nv) bool tensor of the visual tokens active from that layer.
    From each stage layer on, inactive visual tokens are masked out as keys for every query; under reroute
    their layer output is also replaced by their layer input (residual bypass).
    Returns (logits (B, L, V), attention probs of `capture_attn_layer` (B, H, L, L) or None).
    """
    lm = model.model.language_model
    embeds, pos, attn_mask = decoder_inputs(model, inputs)
    b, length, _ = embeds.shape
    if pos is None:
        pos = torch.arange(length)[None].expand(b, -1)
    if pos.dim() == 3 and pos.shape[0] == 4:
        pos = pos[1:]
    cos, sin = lm.rotary_emb(embeds, pos)
    valid = attn_mask.bool() if attn_mask is not None else torch.ones(b, length, dtype=torch.bool)
    vis_pos = visual_positions(inputs["input_ids"], image_token_id)
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))

    def token_active(active):
        a = valid.clone()
        for i, p in enumerate(vis_pos):
            a[i, p] = active[i, : len(p)]
        return a

    stage_at = {layer: act for layer, act in stages}
    present = valid.clone()
    h = embeds
    captured = None
    for li, layer in enumerate(lm.layers):
        if li in stage_at:
            present = token_active(stage_at[li])
        allowed = causal[None] & present[:, None, :]
        mask = torch.zeros(b, 1, length, length, dtype=h.dtype).masked_fill(~allowed[:, None], torch.finfo(h.dtype).min)
        holder = {}
        hook = None
        if li == capture_attn_layer:
            hook = layer.self_attn.register_forward_hook(lambda m, a, out: holder.update(w=out[1]))
        with torch.no_grad():
            out = layer(h, attention_mask=mask, position_embeddings=(cos, sin))
        if hook is not None:
            hook.remove()
            captured = holder["w"]
        out = out[0] if isinstance(out, tuple) else out
        h = torch.where(present[..., None], out, h) if action == "reroute" else out
    with torch.no_grad():
        logits = model.lm_head(lm.norm(h))
    return logits, captured


def text_positions(inputs, image_token_id):
    """(B, L) real text tokens (not padding, not visual)."""
    valid = inputs["attention_mask"].bool()
    return valid & inputs["input_ids"].ne(image_token_id)
