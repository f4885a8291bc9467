"""Attention-based scorers. Attention rows are computed from the stage layer's own q/k projections with RoPE,
in fp32, for the few query rows a scorer needs: no L x L map is ever built."""

from __future__ import annotations

import torch

from visroute.scoring import register
from visroute.scoring.base import Scorer, StageContext
from visroute.tensors import compact_index, gather_rows


def query_attention(ctx: StageContext, query_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention probabilities of the stage layer from the tokens in `query_mask` (B, L+1) to every present key
    (`ctx.key_mask`), causal by sequence position.

    Returns (probs (B, H, Q, K) fp32, query_valid (B, Q), key_index (B, K) sequence positions of the keys;
    padded keys point at the dummy slot and have probability 0)."""
    layer, attn = ctx.layer, ctx.layer.self_attn
    cfg = attn.config
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = attn.head_dim
    dummy = ctx.valid.shape[1] - 1

    k_index, k_valid = compact_index(ctx.key_mask, dummy)
    q_index, q_valid = compact_index(query_mask, dummy)
    device = attn.q_proj.weight.device if attn.q_proj.weight.device.type != "meta" else ctx.hidden.device

    def project(index, proj, heads):
        x = layer.input_layernorm(gather_rows(ctx.hidden, index).to(device))
        y = proj(x).float()
        return y.view(*index.shape, heads, head_dim).transpose(1, 2)  # (B, heads, N, hd)

    q = project(q_index, attn.q_proj, n_heads)
    k = project(k_index, attn.k_proj, n_kv)
    rope = ctx.adapter.rope_function()
    cos_q, sin_q = gather_rows(ctx.cos, q_index).float().to(device), gather_rows(ctx.sin, q_index).float().to(device)
    cos_k, sin_k = gather_rows(ctx.cos, k_index).float().to(device), gather_rows(ctx.sin, k_index).float().to(device)
    q, _ = rope(q, q, cos_q, sin_q)
    _, k = rope(k, k, cos_k, sin_k)

    b, nq = q_index.shape
    groups = n_heads // n_kv
    logits = torch.einsum("bkgqd,bknd->bkgqn", q.view(b, n_kv, groups, nq, head_dim), k) * attn.scaling
    logits = logits.reshape(b, n_heads, nq, -1)
    allowed = k_valid.to(device)[:, None, :] & (k_index.to(device)[:, None, :] <= q_index.to(device)[:, :, None])
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return probs, q_valid, k_index


def key_scores_to_visual(ctx: StageContext, per_key: torch.Tensor, key_index: torch.Tensor) -> torch.Tensor:
    """(B, K) values at key positions -> (B, Nv) values at each sample's visual tokens (0 where absent)."""
    full = torch.zeros(ctx.valid.shape, dtype=per_key.dtype, device=per_key.device)
    full.scatter_(1, key_index.to(per_key.device), per_key)
    full[:, -1] = 0  # the dummy slot collects padded keys
    return full.gather(1, ctx.layout.positions.to(per_key.device))


@register
class LastTokenAttention(Scorer):
    """FastV (Chen et al., 2024) / PyramidDrop (Xing et al., 2025): the attention probability from the last
    prompt token to each visual token at the stage's layer, averaged over heads:

        s_j = 1/H * sum_h softmax_k(q_h(last) . k_h(k) / sqrt(d))[j]

    with q, k from that layer's own projections after RoPE, keys = text tokens + candidate visual tokens."""

    name = "last_token_attention"
    description = "attention from the last prompt token to each visual token, mean over heads (FastV, PyramidDrop)"

    def score(self, ctx: StageContext) -> torch.Tensor:
        query = torch.zeros_like(ctx.valid)
        query.scatter_(1, ctx.last_index[:, None], True)
        probs, _, key_index = query_attention(ctx, query)
        return key_scores_to_visual(ctx, probs.mean(1)[:, 0], key_index)
