"""Redundancy among the visual tokens: keep tokens that duplicate little (DART) or that are diverse (DivPrune).
Both are selection procedures for a budget of k tokens; here they return scores whose top k is that selection
(earlier picks score higher), so the engine's top-k keeps exactly what the procedure picks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from visroute.scoring import option, register
from visroute.scoring.attention import stage_keys
from visroute.scoring.base import Scorer, StageContext
from visroute.tensors import CHUNK_ELEMENTS, compact_index, gather_rows


def _unpicked(n: int) -> int:
    """The pick order of a token not (yet) picked among n: after every possible pick."""
    return 3 * n


def _order_to_scores(order: torch.Tensor) -> torch.Tensor:
    """Pick order (0 = first) -> scores, higher for earlier picks; tokens never picked score below all picks."""
    n = order.shape[1]
    picked = order < _unpicked(n)
    return torch.where(picked, -order.float(), torch.full_like(order, -_unpicked(n) - 1).float())


@register
class Duplication(Scorer):
    """DART (Wen et al., 2025, "Stop looking for important tokens ... duplication matters more"). Pivots: the
    `pivot_visual` candidate visual tokens and the `pivot_text` instruction tokens with the largest L1 norm of
    their keys (all heads concatenated, after RoPE). Each pivot in turn then keeps, from the visual tokens not
    yet kept, the ones least similar to itself:

        block(p) = argmin-m_{j in pool} cos(x_p, x_j),   x = final_norm(h_l),   m = ceil((k - |P_v|) / |P|)

    The kept set is the visual pivots plus each pivot's block; the last block is cut so that exactly k tokens
    are kept (DART keeps the visual pivots plus floor(k/|P|) per pivot, a few more than k). Pivots go in
    sequence order (DART iterates a Python set, whose order is incidental); within a block, least similar first.

    Keys: DART reads the keys layer l-1 left in the K/V cache; here they are the stage layer's own k-projection
    (after its input norm and RoPE) of the states entering it, which exist at layer 0 (the input embeddings, so a
    layer-0 stage prunes before the decoder) and, under reroute, for the carried states of inactive tokens.
    Similarities use the decoder's final norm of those states, as DART does. The L1 norm of a rotated key
    depends on its absolute position (RoPE preserves L2, not L1), so pivots can change with the position ids,
    e.g. between a left-padded `forward` (plain positions) and `generate` (positions that skip padding); DART
    has the same property."""

    name = "duplication"
    description = "DART: keep the visual tokens least similar to a few high-key-norm pivot tokens"
    before_decoder = True  # at layer 0 it needs the input embeddings and layer 0's key projection

    @dataclass(frozen=True)
    class Options:
        pivot_visual: int = option(4, "visual pivot tokens (largest key L1 norm among the candidates)")
        pivot_text: int = option(4, "text pivot tokens (largest key L1 norm among the instruction tokens)")

        def __post_init__(self):
            if self.pivot_visual < 0 or self.pivot_text < 0 or self.pivot_visual + self.pivot_text == 0:
                raise ValueError("pivot_visual and pivot_text must be >= 0 and not both 0")

    def score(self, ctx: StageContext) -> torch.Tensor:
        positions, candidates = ctx.layout.positions, ctx.candidates
        b, nv = positions.shape
        dummy = ctx.dummy
        text_pool = ctx.instruction_mask
        keys, k_index, k_valid = stage_keys(ctx, text_pool | ctx.sequence_mask(candidates))
        device = keys.device
        norm_full = torch.zeros(ctx.valid.shape, dtype=torch.float32, device=device)
        norm_full.scatter_(1, k_index.to(device), keys.abs().sum((1, 3)) * k_valid.to(device))
        candidates = candidates.to(device)

        # visual pivots: top L1 among candidates, ranked by norm; text pivots: top L1 among instruction tokens
        vis_norm = norm_full.gather(1, positions.to(device)).masked_fill(~candidates, float("-inf"))
        n_v = min(self.options.pivot_visual, nv)
        v_norm, v_piv = vis_norm.topk(n_v, dim=1)
        v_valid = v_norm > float("-inf")
        t_index, t_valid = compact_index(text_pool, dummy)
        t_norm = norm_full.gather(1, t_index.to(device)).masked_fill(~t_valid.to(device), float("-inf"))
        n_t = min(self.options.pivot_text, t_index.shape[1])
        t_norm, t_sel = t_norm.topk(n_t, dim=1)
        t_valid = t_norm > float("-inf")
        t_piv = t_index.to(device).gather(1, t_sel)  # sequence positions

        states = ctx.adapter.language_model.norm(ctx.hidden.to(device)).float()
        visual = F.normalize(gather_rows(states, positions), dim=-1)  # (B, Nv, D)
        pivot_pos = torch.cat([positions.to(device).gather(1, v_piv), t_piv], 1)  # (B, P)
        pivot_valid = torch.cat([v_valid, t_valid], 1)
        pivot_pos, by_seq = torch.where(pivot_valid, pivot_pos, dummy + 1).sort(dim=1, stable=True)
        pivot_valid = pivot_valid.gather(1, by_seq)
        pivots = F.normalize(gather_rows(states, pivot_pos.clamp(max=dummy)), dim=-1)  # (B, P, D)

        # visual pivots are kept first, highest norm first
        never = _unpicked(nv)
        order = torch.full((b, nv), never, dtype=torch.long, device=device)
        order.scatter_(1, v_piv, torch.where(v_valid, torch.arange(n_v, device=device).expand(b, -1), never))
        picked = order < never
        taken = picked.sum(1)
        block = torch.ceil((ctx.budget().to(device) - taken).clamp(min=0) / pivot_valid.sum(1).clamp(min=1)).long()
        pool = candidates & ~picked
        rank_of = torch.empty_like(order)
        for p in range(pivots.shape[1]):
            sim = torch.einsum("bd,bvd->bv", pivots[:, p], visual).masked_fill(~pool, float("inf"))
            rank_of.scatter_(1, sim.argsort(dim=1, stable=True), torch.arange(nv, device=device).expand(b, -1))
            take = pool & (rank_of < block[:, None]) & pivot_valid[:, p, None]
            order = torch.where(take, taken[:, None] + rank_of, order)
            taken = taken + take.sum(1)
            pool = pool & ~take
        return _order_to_scores(order)


@register
class Diversity(Scorer):
    """DivPrune (Alvar et al., CVPR 2025): greedy max-min diversity. With d(i, j) = 1 - cos(x_i, x_j) over the
    candidate visual tokens, the first pick is the token farthest from its nearest neighbour,
    argmax_j min_{i != j} d(i, j); then repeatedly

        pick = argmax_{j not picked} min_{s picked} d(s, j)

    until k tokens are picked (ties: the lower index, as torch.argmax). x = the hidden states entering the
    stage's layer, which at layer 0 are DivPrune's projector outputs (a layer-0 stage prunes before the
    decoder). The running minimum is updated with one column per pick, O(N k) after the first pick, whose
    nearest-neighbour search is O(N^2) once, a chunk of rows at a time. A picked token is never picked again
    (DivPrune's code relies on d(s, s) = 0, which exact duplicates can tie)."""

    name = "diversity"
    description = "DivPrune: greedy max-min cosine diversity among the visual tokens"
    before_decoder = True

    def score(self, ctx: StageContext) -> torch.Tensor:
        positions = ctx.layout.positions
        b, nv = positions.shape
        x = F.normalize(gather_rows(ctx.hidden, positions).float(), dim=-1)  # (B, Nv, D)
        device = x.device
        candidates = ctx.candidates.to(device)
        steps = int(ctx.budget().max()) if b else 0
        order = torch.full((b, nv), _unpicked(nv), dtype=torch.long, device=device)
        if steps == 0:
            return _order_to_scores(order)

        # nearest other candidate of each token, a chunk of rows at a time
        nearest = torch.full((b, nv), float("-inf"), device=device)
        rows = max(1, CHUNK_ELEMENTS // max(1, b * nv))
        columns = torch.arange(nv, device=device)
        for start in range(0, nv, rows):
            sim = torch.einsum("brd,bvd->brv", x[:, start : start + rows], x)
            self_pair = columns[None, None, :] == columns[start : start + rows, None][None]
            sim = sim.masked_fill(~candidates[:, None, :] | self_pair, float("-inf"))
            nearest[:, start : start + rows] = sim.amax(-1)
        spread = 1.0 - nearest  # +inf for a lone candidate

        pool = candidates.clone()
        min_dist = torch.full((b, nv), float("inf"), device=device)
        batch = torch.arange(b, device=device)
        for t in range(steps):
            gain = spread if t == 0 else min_dist
            pick = gain.masked_fill(~pool, float("-inf")).argmax(1)
            live = pool[batch, pick]
            order[batch[live], pick[live]] = t
            pool[batch, pick] = False
            min_dist = torch.minimum(min_dist, 1.0 - torch.einsum("bvd,bd->bv", x, x[batch, pick]))
        return _order_to_scores(order)
