"""Attention-based scorers. Attention rows are computed from the stage layer's own q/k projections with RoPE,
in fp32, for the few query rows a scorer needs: no L x L map is ever built."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from visroute.scoring import option, register
from visroute.scoring.base import Scorer, StageContext
from visroute.tensors import CHUNK_ELEMENTS, compact_index, gather_rows


def _project(ctx: StageContext, index: torch.Tensor, which: str, device) -> torch.Tensor:
    """The stage layer's query (`which="q"`) or key ("k") projection of the tokens at `index` (B, N), after its
    input norm, its per-head q/k norm when it has one (Qwen3, Gemma 3, InternVL3.5 decoders) and RoPE at their
    positions, as the layer itself computes them, in fp32: (B, heads, N, head_dim)."""
    layer, attn = ctx.layer, ctx.layer.self_attn
    heads = attn.config.num_attention_heads if which == "q" else attn.config.num_key_value_heads
    x = layer.input_layernorm(gather_rows(ctx.hidden, index).to(device))
    y = getattr(attn, f"{which}_proj")(x).view(*index.shape, heads, attn.head_dim)
    norm = getattr(attn, f"{which}_norm", None)
    if norm is not None:
        y = norm(y)
    y = y.float().transpose(1, 2)
    cos = gather_rows(ctx.cos, index).float().to(device)
    sin = gather_rows(ctx.sin, index).float().to(device)
    y, _ = ctx.adapter.rope_function()(y, y, cos, sin)
    return y


def _layer_device(ctx: StageContext) -> torch.device:
    weight = ctx.layer.self_attn.q_proj.weight
    return weight.device if weight.device.type != "meta" else ctx.hidden.device


def stage_keys(ctx: StageContext, key_mask: torch.Tensor | None = None):
    """The stage layer's keys (after RoPE, fp32) of the tokens in `key_mask` (default: `ctx.key_mask`).
    Returns (keys (B, kv_heads, K, head_dim), key_index (B, K), key_valid (B, K))."""
    k_index, k_valid = compact_index(ctx.key_mask if key_mask is None else key_mask, ctx.dummy)
    keys = _project(ctx, k_index, "k", _layer_device(ctx))
    return keys, k_index, k_valid


def _probs(ctx, q, q_index, k, k_index, k_valid) -> torch.Tensor:
    """Causal attention probabilities (B, H, Q, K) of queries q (B, H, Q, hd) over keys k (B, kv, K, hd)."""
    attn = ctx.layer.self_attn
    b, n_heads, nq, head_dim = q.shape
    n_kv = k.shape[1]
    device = q.device
    q = q * attn.scaling  # scale the few query rows, not the logits
    logits = torch.einsum("bkgqd,bknd->bkgqn", q.view(b, n_kv, n_heads // n_kv, nq, head_dim), k)
    logits = logits.reshape(b, n_heads, nq, -1)
    allowed = k_valid.to(device)[:, None, :] & (k_index.to(device)[:, None, :] <= q_index.to(device)[:, :, None])
    logits.masked_fill_(~allowed[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num_(0.0)


def query_attention(ctx: StageContext, query_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention probabilities of the stage layer from the tokens in `query_mask` (B, L+1) to every present key
    (`ctx.key_mask`), causal by sequence position.

    Returns (probs (B, H, Q, K) fp32, query_valid (B, Q), key_index (B, K) sequence positions of the keys;
    padded keys point at the dummy slot and have probability 0)."""
    k, k_index, k_valid = stage_keys(ctx)
    q_index, q_valid = compact_index(query_mask, ctx.dummy)
    q = _project(ctx, q_index, "q", k.device)
    return _probs(ctx, q, q_index, k, k_index, k_valid), q_valid, k_index


def mean_query_attention(ctx: StageContext, query_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The stage layer's attention from the tokens in `query_mask` to every present key, averaged over heads
    and over each sample's queries; the query rows are computed a chunk at a time.

    Returns (mean probs (B, K) fp32, key_index (B, K))."""
    n_heads = ctx.layer.self_attn.config.num_attention_heads
    k, k_index, k_valid = stage_keys(ctx)
    q_index, q_valid = compact_index(query_mask, ctx.dummy)
    b, n_keys = k_index.shape
    rows = max(1, CHUNK_ELEMENTS // max(1, b * n_heads * n_keys))
    total = torch.zeros(b, n_keys, dtype=torch.float32, device=k.device)
    for start in range(0, q_index.shape[1], rows):
        index = q_index[:, start : start + rows]
        q = _project(ctx, index, "q", k.device)
        probs = _probs(ctx, q, index, k, k_index, k_valid).mean(1)  # (B, rows, K)
        total += (probs * q_valid[:, start : start + rows, None].to(k.device)).sum(1)
    count = q_valid.sum(1).clamp(min=1).to(k.device)
    return total / count[:, None], k_index


@register
class LastTokenAttention(Scorer):
    """FastV (Chen et al., 2024) / PyramidDrop (Xing et al., 2025): the attention probability from the last
    prompt token to each visual token at the stage's layer, averaged over heads:

        s_j = 1/H * sum_h softmax_k(q_h(last) . k_h(k) / sqrt(d))[j]

    with q, k from that layer's own projections after RoPE, keys = text tokens + candidate visual tokens.

    Options for Nüwa's Qwen2.5-VL stage 2 (`queries=3, heads="max"`): the queries may be the last `queries` text
    tokens of the prompt (each attends causally), their probabilities averaged over those queries and then
    reduced over heads by `heads`, mean or max:

        s_j = reduce_h  1/Q * sum_{q in last Q} softmax_k(q_h(q) . k_h(k) / sqrt(d))[j]

    (the released Qwen code takes the last 3 positions of the sequence, `attn[:, :, -3:].mean(queries)
    .max(heads)`; here the last 3 text tokens, which are the same unless an image sits among the prompt's last
    tokens). The defaults are FastV's rule."""

    name = "last_token_attention"
    description = "attention from the last prompt token to each visual token, mean over heads (FastV, PyramidDrop)"

    @dataclass(frozen=True)
    class Options:
        queries: int = option(1, "the last n text tokens of the prompt that query; their attention is averaged")
        heads: str = option("mean", "reduce over heads: mean (FastV) or max (Nüwa's Qwen2.5-VL stage 2)",
                            choices=("mean", "max"))

        def __post_init__(self):
            if self.queries < 1:
                raise ValueError(f"queries must be at least 1, got {self.queries}")

    def score(self, ctx: StageContext) -> torch.Tensor:
        if self.options.queries == 1 and self.options.heads == "mean":
            probs, _, key_index = query_attention(ctx, ctx.position_mask(ctx.last_index))
            return ctx.to_visual(probs.mean(1)[:, 0], key_index)
        text = ctx.text & ctx.valid
        from_end = text.flip(1).long().cumsum(1).flip(1)  # text tokens at or after each position
        queries = text & (from_end <= self.options.queries)
        probs, q_valid, key_index = query_attention(ctx, queries)  # (B, H, Q, K)
        q_valid = q_valid.to(probs.device)
        mean = (probs * q_valid[:, None, :, None]).sum(2) / q_valid.sum(1).clamp(min=1)[:, None, None]  # (B, H, K)
        reduced = mean.mean(1) if self.options.heads == "mean" else mean.amax(1)
        return ctx.to_visual(reduced, key_index)


def rater_mask(ctx: StageContext, query_mask: torch.Tensor) -> torch.Tensor:
    """SparseVLM's text raters (Zhang et al., 2025, sec. 3.2): among the query tokens, those whose relevance to
    the image, computed from the input embeddings, exceeds the sample's mean relevance:

        R = mean_over_visual_v softmax_over_text_t( e_v . e_t ),   raters = { t : R_t > mean_t R_t }

    A sample where no token exceeds the mean (e.g. a single query token) keeps all its query tokens."""
    t_index, t_valid = compact_index(query_mask, ctx.dummy)
    visual = gather_rows(ctx.inputs_embeds, ctx.layout.positions).float()  # (B, Nv, D)
    text = gather_rows(ctx.inputs_embeds, t_index).float()  # (B, T, D)
    logits = torch.einsum("bvd,btd->bvt", visual, text).masked_fill(~t_valid[:, None, :], float("-inf"))
    per_visual = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # (B, Nv, T)
    v_valid = ctx.layout.valid.to(per_visual.device)
    relevance = (per_visual * v_valid[..., None]).sum(1) / v_valid.sum(1, keepdim=True).clamp(min=1)  # (B, T)
    mean = (relevance * t_valid).sum(1, keepdim=True) / t_valid.sum(1, keepdim=True).clamp(min=1)
    raters = t_valid & (relevance > mean)
    raters = torch.where(raters.any(1, keepdim=True), raters, t_valid)
    out = torch.zeros_like(query_mask)
    out.scatter_(1, t_index, raters)
    out[:, ctx.dummy] = False
    return out


@register
class TextAttention(Scorer):
    """SparseVLM-style text-to-visual attention (Zhang et al., 2025): the attention probability from the
    instruction tokens to each visual token at the stage's layer, averaged over heads and over the queries:

        s_j = 1/|Q| * sum_{q in Q} 1/H * sum_h softmax_k(q_h(q) . k_h(k) / sqrt(d))[j]

    with q, k from that layer's own projections after RoPE (fp32), keys = text tokens + candidate visual tokens,
    and Q = the instruction tokens (prompt tokens after the last visual token; the last prompt token when
    there are none). With `raters=True`, Q keeps only SparseVLM's "raters": the instruction tokens whose
    input-embedding relevance to the image exceeds the mean (see `rater_mask`). SparseVLM then adds token
    recycling and a rank-based keep count; those are not part of the signal and are left out."""

    name = "text_attention"
    description = "attention from the instruction tokens to each visual token, mean over heads and queries (SparseVLM)"

    @dataclass(frozen=True)
    class Options:
        raters: bool = option(False, "keep only SparseVLM's rater tokens (embedding relevance to the image above the mean)")

    def score(self, ctx: StageContext) -> torch.Tensor:
        queries = ctx.query_text_mask
        if self.options.raters:
            queries = rater_mask(ctx, queries)
        mean, key_index = mean_query_attention(ctx, queries)
        return ctx.to_visual(mean, key_index)
