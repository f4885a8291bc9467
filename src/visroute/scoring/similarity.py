"""Cross-modal similarity without attention: cosine similarity between visual tokens and text tokens, from the
input embeddings or from the hidden states entering the stage's layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from visroute.scoring import option, register
from visroute.scoring.base import Scorer, StageContext
from visroute.tensors import compact_index, gather_rows

REDUCTIONS = ("max", "mean")


def cosine_to_text(ctx: StageContext, states: torch.Tensor, text_mask: torch.Tensor, reduce: str) -> torch.Tensor:
    """(B, Nv): for each visual token, its cosine similarity (fp32) to the tokens in `text_mask` (B, L+1),
    reduced over them by max or mean. `states` (B, L+1, D) holds the vectors of every position."""
    t_index, t_valid = compact_index(text_mask, ctx.dummy)
    visual = F.normalize(gather_rows(states, ctx.layout.positions).float(), dim=-1)  # (B, Nv, D)
    text = F.normalize(gather_rows(states, t_index.to(states.device)).float(), dim=-1)  # (B, T, D)
    sim = torch.einsum("bvd,btd->bvt", visual, text)
    t_valid = t_valid.to(sim.device)[:, None, :]
    if reduce == "max":
        return sim.masked_fill(~t_valid, float("-inf")).amax(-1)
    return (sim * t_valid).sum(-1) / t_valid.sum(-1).clamp(min=1)


@register
class EmbeddingSimilarity(Scorer):
    """Cosine similarity between each visual token's input embedding (after the projector) and the input
    embeddings of the instruction tokens (prompt tokens after the last visual token; the last prompt token when
    there are none), reduced over the instruction tokens:

        s_j = reduce_{t in instruction} cos(e_j, e_t),   reduce = mean (default) or max

    The token-embedding family of signals: text-aware without attention scores. CDPruner (Zhang et al., 2025)
    computes a related instruction relevance, the mean cosine over instruction tokens, but in CLIP's joint
    image-text space (and negated, for LLaVA, before its DPP); here it is the decoder's own input space, which
    needs no CLIP text encoder and exists for every family. `max` keeps a token that matches any one
    instruction token. It needs nothing from the decoder layers, so a layer-0 stage prunes
    before the decoder runs."""

    name = "embedding_similarity"
    description = "cosine similarity of visual and instruction-token input embeddings (after the projector)"
    before_decoder = True

    @dataclass(frozen=True)
    class Options:
        reduce: str = option("mean", "over the instruction tokens: mean or max", choices=REDUCTIONS)

    def score(self, ctx: StageContext) -> torch.Tensor:
        return cosine_to_text(ctx, ctx.inputs_embeds, ctx.query_text_mask, self.options.reduce)


@register
class HiddenSimilarity(Scorer):
    """Late-layer cross-modal similarity: the cosine similarity between the hidden states of the visual tokens
    and of the text tokens entering the stage's layer, so that a late stage compares late representations:

        s_j = reduce_{t in T} cos(h_l(j), h_l(t)),   reduce = mean (default) or max

    with T the instruction tokens (`text_tokens="instruction"`; the last prompt token when there are none) or
    the last prompt token alone (`text_tokens="last"`). It is cross-modal and uses no attention scores (no RoPE
    distance bias), and unlike `embedding_similarity` it can be placed late, where visual tokens have become
    more text-interpretable. Under reroute the inactive visual tokens are scored from the states they carry.
    At layer 0 it equals `embedding_similarity`."""

    name = "hidden_similarity"
    description = "cosine similarity of visual and text hidden states entering the stage's layer (late, cross-modal, no attention)"
    before_decoder = True  # at layer 0 it needs only the input embeddings

    @dataclass(frozen=True)
    class Options:
        reduce: str = option("mean", "over the text tokens: mean or max", choices=REDUCTIONS)
        text_tokens: str = option("instruction", "which text tokens: instruction or last",
                                  choices=("instruction", "last"))

    def score(self, ctx: StageContext) -> torch.Tensor:
        text = ctx.position_mask(ctx.last_index) if self.options.text_tokens == "last" else ctx.query_text_mask
        return cosine_to_text(ctx, ctx.hidden, text, self.options.reduce)
