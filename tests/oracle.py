"""Independent references for the routing semantics: the unmodified model run layer by layer over the full
sequence with eager attention and explicit L x L masks (slow and obviously correct); and plain-Python versions
of the scorers' selection procedures."""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache


def eager_copy(model, builder):
    """A second instance of the same weights with eager attention."""
    ref = builder(attn="eager")
    ref.load_state_dict(model.state_dict())
    return ref.eval()


def decoder_inputs(model, inputs):
    """What the unmodified model feeds its text decoder: (inputs_embeds, position_ids, attention_mask)."""
    seen = decoder_call(model, inputs)
    return seen["inputs_embeds"], seen.get("position_ids"), seen.get("attention_mask")


def decoder_call(model, inputs):
    """Every keyword input the unmodified model gives its text decoder (Qwen3-VL's DeepStack features too)."""
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
    return seen


def visual_positions(input_ids, token_id):
    """Per sample, the sequence positions of its visual tokens."""
    return [row.eq(token_id).nonzero().flatten() for row in input_ids]


def with_generated(inputs, generated):
    """`inputs` followed by `generated` (B, T) text tokens: ids appended, attention mask and token types
    extended (generated tokens are text, never padding)."""
    out = dict(inputs)
    b, t = generated.shape
    out["input_ids"] = torch.cat([inputs["input_ids"], generated], 1)
    mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
    out["attention_mask"] = torch.cat([mask, torch.ones(b, t, dtype=torch.long)], 1)
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros(b, t, dtype=torch.long)], 1)
    return out


@dataclass
class OracleRun:
    """What `masked_run` computed.

    logits:    (B, L, V)
    hidden:    hidden[l] (B, L, D) is the input of decoder layer l (hidden[-1]: the last layer's output)
    cache:     a DynamicCache holding every layer's keys and values of every position (B, kv heads, L, hd),
               as the layers computed them (after any q/k norm and RoPE)
    present:   present[l] (B, L): the tokens that are keys in layer l (padding excluded)
    rotary:    the (cos, sin) the layers ran with
    valid:     (B, L) real (non-padding) tokens
    attention: the attention probabilities (B, H, L, L) of `capture_attn_layer`, or None
    """

    logits: torch.Tensor
    hidden: list[torch.Tensor]
    cache: DynamicCache
    present: list[torch.Tensor]
    rotary: tuple[torch.Tensor, torch.Tensor]
    valid: torch.Tensor
    attention: torch.Tensor | None


def masked_run(model, inputs, image_token_id, stages, action, generated=None, position_ids=None,
               capture_attn_layer=None) -> OracleRun:
    """The masking oracle of docs/DESIGN.md rules 2 and 3 (and, with `generated`, rule 4).

    model:     an eager-attention model (see `eager_copy`)
    stages:    list of (layer, active), active a (B, Nv) bool tensor of the visual tokens active from that layer.
               From each stage layer on, inactive visual tokens are masked out as keys for every query; under
               reroute their layer output is also replaced by their layer input (residual bypass).
    action:    "prune" or "reroute", or one per stage (a config whose stages name their own action): the bypass
               applies in the layers of a reroute stage.
    generated: (B, T) tokens that follow the prompt (the decode steps of `generate`): text, active everywhere.
    position_ids: the position ids the decoder runs with (default: those the unmodified model computes)
    """
    if generated is not None:
        inputs = with_generated(inputs, generated)
    lm = model.model.language_model
    seen = decoder_call(model, inputs)
    embeds, pos = seen["inputs_embeds"], seen.get("position_ids")
    # Qwen3-VL: DeepStack feature l is added to every visual position after decoder layer l, outside the layer
    deepstack, deep_mask = seen.get("deepstack_visual_embeds"), seen.get("visual_pos_masks")
    b, length, _ = embeds.shape
    if position_ids is not None:
        pos = position_ids
    if pos is None:
        pos = torch.arange(length)[None].expand(b, -1)
    if pos.dim() == 3 and pos.shape[0] == 4:  # Qwen's M-RoPE: a leading row of text positions for packed masks
        pos = pos[1:]
    cos, sin = lm.rotary_emb(embeds, pos)
    given = inputs.get("attention_mask")
    valid = given.bool() if given is not None else torch.ones(b, length, dtype=torch.bool)
    vis_pos = visual_positions(inputs["input_ids"], image_token_id)
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))

    def token_active(active):
        a = valid.clone()
        for i, p in enumerate(vis_pos):
            a[i, p] = active[i, : len(p)]
        return a

    stage_at = {layer: act for layer, act in stages}
    actions = [action] * len(stages) if isinstance(action, str) else list(action)
    action_at = {layer: a for (layer, _), a in zip(stages, actions)}
    current = "prune"  # before the first stage every token runs: no bypass to apply
    present = valid.clone()
    h = embeds
    hidden, presents, captured = [h], [], None
    cache = DynamicCache()
    for li, layer in enumerate(lm.layers):
        if li in stage_at:
            present = token_active(stage_at[li])
            current = action_at[li]
        presents.append(present)
        allowed = causal[None] & present[:, None, :]
        mask = torch.zeros(b, 1, length, length, dtype=h.dtype).masked_fill(~allowed[:, None], torch.finfo(h.dtype).min)
        holder = {}
        hook = None
        if li == capture_attn_layer:
            hook = layer.self_attn.register_forward_hook(lambda m, a, out: holder.update(w=out[1]))
        with torch.no_grad():
            out = layer(h, attention_mask=mask, position_embeddings=(cos, sin), past_key_values=cache, use_cache=True)
        if hook is not None:
            hook.remove()
            captured = holder["w"]
        out = out[0] if isinstance(out, tuple) else out
        h = torch.where(present[..., None], out, h) if current == "reroute" else out
        if deepstack is not None and li < len(deepstack):
            h = h.clone()
            h[deep_mask] = h[deep_mask] + deepstack[li].to(h.dtype)
        hidden.append(h)
    with torch.no_grad():
        logits = model.lm_head(lm.norm(h))
    return OracleRun(logits=logits, hidden=hidden, cache=cache, present=presents, rotary=(cos, sin), valid=valid,
                     attention=captured)


def masked_forward(model, inputs, image_token_id, stages, action, capture_attn_layer=None, generated=None):
    """`masked_run`'s (logits (B, L, V), attention probs of `capture_attn_layer` (B, H, L, L) or None)."""
    run = masked_run(model, inputs, image_token_id, stages, action, generated=generated,
                     capture_attn_layer=capture_attn_layer)
    return run.logits, run.attention


def text_positions(inputs, image_token_id):
    """(B, L) real text tokens (not padding, not visual)."""
    valid = inputs["attention_mask"].bool()
    return valid & inputs["input_ids"].ne(image_token_id)


def instruction_positions(inputs, image_token_id):
    """Per sample: the prompt positions after its last visual token (left padding: the prompt ends at L-1)."""
    out = []
    for row in inputs["input_ids"]:
        last_visual = int(row.eq(image_token_id).nonzero().max())
        out.append(torch.arange(last_visual + 1, row.shape[0]))
    return out


def dart_reference(key_l1, states, vis, instr, keep, n_visual, n_text):
    """DART with Python sets and lists: pivots by key L1 norm, then each pivot (sequence order) keeps its
    least-similar block from the remaining visual tokens; exactly `keep` tokens."""
    vis, instr = vis.tolist(), instr.tolist()
    visual_pivots = sorted(vis, key=lambda p: -float(key_l1[p]))[:n_visual]
    text_pivots = sorted(instr, key=lambda p: -float(key_l1[p]))[:n_text]
    kept = list(visual_pivots)
    pivots = sorted(visual_pivots + text_pivots)
    block = math.ceil(max(keep - len(visual_pivots), 0) / len(pivots))
    pool = [p for p in vis if p not in visual_pivots]
    for p in pivots:
        ranked = sorted(pool, key=lambda j: (float(F.cosine_similarity(states[p], states[j], dim=0)), j))
        kept += ranked[:block]
        pool = [j for j in pool if j not in ranked[:block]]
    return sorted(vis.index(p) for p in kept[:keep])


# ---- LLaVA-NeXT / OneVision tiles --------------------------------------------------------------------------------
def _image_args(inputs):
    return {k: inputs[k] for k in ("pixel_values", "image_sizes", "batch_num_images") if k in inputs}


def tiled_layout(model, inputs, per_tile):
    """LLaVA-NeXT / OneVision: one value per patch of every tile the tower encodes for `inputs` (per_tile (tiles,
    patches), the tiles in the order the model encodes them) laid out as the model lays out its image features:
    through its own `get_image_features`, with the projector replaced by one that outputs each patch's value and
    the newline vector by 0. Returns one tensor per image."""
    inner = model.model
    hidden = model.config.text_config.hidden_size
    projector = inner.multi_modal_projector

    def project(x):
        out = x.new_zeros(*x.shape[:-1], hidden)
        out[..., 0] = per_tile.to(x.dtype)
        return out

    saved = inner.image_newline.detach().clone()
    projector.forward = project
    try:
        with torch.no_grad():
            inner.image_newline.zero_()
            features = inner.get_image_features(**_image_args(inputs)).pooler_output
    finally:
        del projector.forward
        with torch.no_grad():
            inner.image_newline.copy_(saved)
    return [f[:, 0].float() for f in features]


def tiled_vision_reference(model, inputs, layer):
    """LLaVA-NeXT / OneVision (an eager-attention model): the tower's own attention weights at `layer` for every
    tile ([CLS] row summed over heads, [CLS] dropped; without [CLS], the attention each patch receives, summed over
    heads and averaged over its tile's queries), laid out by `tiled_layout`. One tensor per span of the routing
    record: each image's base tile, then the rest of its tokens."""
    inner = model.model
    with torch.no_grad():
        attn = inner.get_image_features(**_image_args(inputs), output_attentions=True).attentions[layer]
    tower = getattr(inner.vision_tower, "vision_model", inner.vision_tower)
    if hasattr(tower.embeddings, "class_embedding"):
        per_tile = attn[:, :, 0, 1:].sum(1)
    else:
        per_tile = attn.sum(1).mean(1)
    base = per_tile.shape[1]
    return [piece for image in tiled_layout(model, inputs, per_tile) for piece in (image[:base], image[base:])]
