"""Selection primitives: procedures that pick k of the N visual tokens of one image, given per-token importance
and features. Each takes one image's tokens (importance (N,), features (N, D)) and returns the picked indices
(long, into the N tokens) in pick order. The scorers of `visroute.scoring.frontier` run them per image and turn
the pick order into scores; any stage or third-party scorer can call them the same way.

* `importance_then_diversity`: VisPruner's important share, then de-duplication of the rest;
* `greedy_dpp_map` / `conditional_dpp`: CDPruner's conditional DPP, kernel diag(r) S diag(r), greedy MAP;
* `region_quotas`: HoloV's per-crop quotas;
* `saliency_coverage`: SCOPE's saliency-weighted facility-location greedy.

All work in fp32 and break ties towards the lower index (the released code runs in fp16 on CUDA, where
`argsort`/`topk`/`argmax` are not stable; exact ties have measure zero on real features).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DEDUP_STEP = 8  # VisPruner removes at most this many duplicates per matching round
HOLOV_BETA = 0.09  # HoloV's weight of the similarity-variance term (LLaVA and Qwen2.5-VL code)
HOLOV_ATTENTION_SCALE = 1e3  # HoloV scales the attention by 1e3 before mixing it with the variance
HOLOV_EPS = 1e-6


def _order_desc(values: torch.Tensor) -> torch.Tensor:
    """Indices by value, descending, ties to the lower index."""
    return torch.sort(values, descending=True, stable=True).indices


def importance_then_diversity(importance: torch.Tensor, features: torch.Tensor, keep: int, important: int,
                              step: int = DEDUP_STEP) -> torch.Tensor:
    """VisPruner (Zhang et al., ICCV 2025, "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective
    Token Pruning in VLMs"; `Theia-4869/VisPruner`, `llava/model/llava_arch.py` `encode_images`).

    The `important` tokens with the highest importance are kept first (by importance, descending). The rest, R
    tokens in that same order, are de-duplicated down to keep - important: each round splits them by position
    into a = R[0::2] and b = R[1::2], scores each a-token by its nearest b-token,

        s(a_i) = max_j cos(x_{a_i}, x_{b_j}),

    drops the r = min(step, R - (keep - important)) a-tokens with the highest s, and continues with
    [the other a-tokens by s descending, then b in order], until exactly keep - important remain.

    Departure: with an odd R the released code fails (it indexes R // 2 a-tokens where R[0::2] holds
    ceil(R / 2)); here a holds ceil(R / 2) tokens. Returns the important tokens, then the diverse ones."""
    n = importance.shape[0]
    keep = min(int(keep), n)
    important = max(0, min(int(important), keep))
    diverse = keep - important
    ranked = _order_desc(importance.float())
    picked, residual = ranked[:important], ranked[important:]
    if diverse == 0:
        return picked
    x = F.normalize(features.float(), dim=-1)
    sim = x @ x.T  # once: the rounds then only gather (the released code recomputes a x b per round)
    while residual.numel() > diverse:
        r = min(step, residual.numel() - diverse)
        a, b = residual[0::2], residual[1::2]
        nearest = sim.index_select(0, a).index_select(1, b).amax(1)
        distinct = _order_desc(nearest)[r:]
        residual = torch.cat([a[distinct], b])
    return torch.cat([picked, residual])


def greedy_dpp_map(kernel: torch.Tensor, keep: int, fallback: torch.Tensor | None = None,
                   eps: float = 1e-5) -> torch.Tensor:
    """Greedy MAP inference of a DPP with kernel L (N, N) (Chen et al., NeurIPS 2018, "Fast Greedy MAP Inference
    for Determinantal Point Process"), as CDPruner runs it: with d_j^2 = L_jj and no rows c yet, repeatedly

        j = argmax d^2,   e = (L_j - c_{:, j}^T c) / d_j,   c <- [c; e],   d^2 <- d^2 - e^2,

    which picks argmax_j log det L_{S + j} at each step in O(N k) per pick (O(N k^2) for k picks, memory O(N k)).

    Departure: once every remaining d^2 is at most `eps` times the largest diagonal entry, L restricted to the
    rest is numerically singular (k above the rank of the features; fp32 leaves residues near 1e-7 there). The
    released code then divides by the square root of a non-positive number or of rounding noise and picks by
    NaN or noise; here the remaining picks follow `fallback` (descending; default: the kernel diagonal)."""
    kernel = kernel.float()
    return _greedy_dpp(torch.diagonal(kernel), lambda j: kernel[j], keep, fallback, eps)


def _greedy_dpp(diagonal: torch.Tensor, row, keep: int, fallback: torch.Tensor | None, eps: float) -> torch.Tensor:
    """`greedy_dpp_map` given the kernel's diagonal and a function j -> its row j (only the picked rows are ever
    needed: O(N k D) to build them from features instead of O(N^2 D) for the whole kernel)."""
    n = diagonal.shape[0]
    keep = min(int(keep), n)
    d2 = diagonal.float().clone()
    rows = d2.new_zeros((keep, n))
    picks = torch.empty(keep, dtype=torch.long, device=d2.device)
    available = torch.ones(n, dtype=torch.bool, device=d2.device)
    limit = eps * float(d2.max().clamp(min=0)) if n else 0.0
    for i in range(keep):
        gain = d2.masked_fill(~available, float("-inf"))
        j = int(gain.argmax())
        if not gain[j] > limit:
            rest = _order_desc((diagonal if fallback is None else fallback).float().masked_fill(~available,
                                                                                              float("-inf")))
            picks[i:] = rest[: keep - i]
            break
        picks[i] = j
        e = (row(j) - rows[:i, j] @ rows[:i]) / d2[j].sqrt()
        rows[i] = e
        d2 = d2 - e * e
        available[j] = False
    return picks


def conditional_dpp(features: torch.Tensor, relevance: torch.Tensor, keep: int) -> torch.Tensor:
    """CDPruner (Zhang et al., NeurIPS 2025, "Beyond Attention or Similarity: Maximizing Conditional Diversity
    for Token Pruning in MLLMs"; `Theia-4869/CDPruner`, `llava/model/llava_arch.py` `encode_images`): the
    conditional kernel

        L = diag(r) S diag(r),   S_ij = cos(x_i, x_j),

    with r the tokens' instruction relevance, then `greedy_dpp_map`, building only the kernel rows it picks
    (the released code builds the whole N x N kernel; same picks). Past the rank of the features the remaining
    picks go by relevance."""
    x = F.normalize(features.float(), dim=-1)
    r = relevance.float()
    diagonal = (x * x).sum(1) * r * r
    return _greedy_dpp(diagonal, lambda j: r[j] * (x @ x[j]) * r, keep, r, 1e-5)


def cdpruner_relevance(visual: torch.Tensor, text: torch.Tensor, negate: bool = False) -> torch.Tensor:
    """CDPruner's relevance of each visual token (N, C) to the instruction's text embeddings (M, C): the mean
    cosine over the text rows (negated for CLIP embeddings, as the released LLaVA code does), min-max normalised
    to [~0, 1]: (v - min + 1e-6) / (max - min). A constant v (max = min) gives 1 for every token."""
    rel = F.normalize(visual.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T
    rel = rel.mean(1)
    rel = -rel if negate else rel
    span = rel.max() - rel.min()
    if not span > 0:
        return torch.ones_like(rel)
    return (rel - rel.min() + 1e-6) / span


def holov_crops(num_tokens: int, keep: int) -> int:
    """HoloV's number of crops: max(1, int(1024 / 576 * N / k)) (its Qwen2.5-VL code; the LLaVA code's fixed 16
    crops at k = 64 of N = 576 is the same rule)."""
    return max(1, int((1024 / 576) * num_tokens / max(1, keep)))


def region_quotas(importance: torch.Tensor, features: torch.Tensor, keep: int, crops: int,
                  alpha: float = 1.0, beta: float = HOLOV_BETA, power: float = 1.0) -> torch.Tensor:
    """HoloV (Zou et al., NeurIPS 2025, "Don't Just Chase 'Highlighted Tokens' in MLLMs: Revisiting Visual
    Holistic Context Retention"; `obananas/HoloV`, `llava/model/utils.py` and `qwen-model-HoloV/utils.py`
    `HoloV`). The N tokens, in token order, are cut into `crops` contiguous runs (the first N mod crops one
    longer). In a run of n >= 2 tokens with attention a and cosine matrix S (diagonal zeroed),

        m_i = sum_{j != i} S_ij / (n - 1),   v_i = sum_j (S_ij - m_i)^2 / (n - 1)   (j over all n, as the code),
        t_i = alpha 1e3 a_i + beta v_i * mean|1e3 a| / (mean|v| + 1e-6),   score(run) = mean_i t_i;

    a run of one token scores its attention. Each run's quota is floor(k w) with w = score^power / (sum + 1e-6),
    and the k - sum(floor) tokens left go one each to the runs of highest w. A run keeps its quota of tokens with
    the highest attention, or all of its tokens when the quota reaches its size.

    Departure: when quotas exceed their runs, the released code keeps fewer than k tokens and pads the LLM input
    with zero vectors; here the shortfall is filled with the highest-attention tokens not yet kept (a zero
    vector is no visual token, and the tier must be reached). Returns the picks run by run, each run by
    attention (descending), then any fill-in."""
    n = importance.shape[0]
    keep = min(int(keep), n)
    a = importance.float()
    x = features.float()
    crops = max(1, min(int(crops), n))
    base, extra = divmod(n, crops)
    sizes = [base + (1 if p < extra else 0) for p in range(crops)]
    starts = [sum(sizes[:p]) for p in range(crops)]
    scores = []
    for start, size in zip(starts, sizes):
        at = a[start : start + size]
        if size <= 1:
            scores.append(at.mean())
            continue
        f = x[start : start + size]
        f = f / (f.norm(dim=1, keepdim=True) + HOLOV_EPS)
        s = (f @ f.T) * (1 - torch.eye(size, device=f.device))
        mean = s.sum(1) / (size - 1)
        var = ((s - mean[:, None]) ** 2).sum(1) / (size - 1)
        scaled = at * HOLOV_ATTENTION_SCALE
        var_scaled = var * (scaled.abs().mean() / (var.abs().mean() + HOLOV_EPS))
        scores.append((alpha * scaled + beta * var_scaled).mean())
    w = torch.stack(scores) ** power
    w = w / (w.sum() + HOLOV_EPS)
    quota = torch.floor(w * keep).long()
    left = keep - int(quota.sum())
    if left > 0:
        quota[_order_desc(w)[: min(left, crops)]] += 1
    picks = []
    for start, size, q in zip(starts, sizes, quota.tolist()):
        if q <= 0:
            continue
        idx = torch.arange(start, start + size, device=a.device)
        picks.append(idx if q >= size else idx[_order_desc(a[start : start + size])[:q]])
    picked = torch.cat(picks) if picks else torch.zeros(0, dtype=torch.long, device=a.device)
    picked = picked[:keep]
    if picked.numel() < keep:
        rest = torch.ones(n, dtype=torch.bool, device=a.device)
        rest[picked] = False
        fill = _order_desc(a.masked_fill(~rest, float("-inf")))[: keep - picked.numel()]
        picked = torch.cat([picked, fill])
    return picked


def saliency_coverage(saliency: torch.Tensor, features: torch.Tensor, keep: int, alpha: float = 1.0,
                      combine: str = "multi") -> torch.Tensor:
    """SCOPE (Deng et al., NeurIPS 2025, "SCOPE: Saliency-Coverage Oriented Token Pruning for Efficient
    Multimodel LLMs"; `kinredon/SCOPE`, `scope/clip_encoder.py` `SCOPE`): greedy maximisation of a
    saliency-weighted facility-location coverage. With S_ij = cos(x_i, x_j) and c_i = max(0, max_{s picked} S_is)
    (0 before the first pick), each step picks

        argmax_{j not picked}  g_j * s_j^alpha   ("multi", the default)   or   g_j + s_j^alpha   ("add"),
        g_j = sum_i max(0, S_ij - c_i)   (i over all N tokens),

    with s the saliency. The released code recomputes every g_j from the N x N matrix at each pick (O(N^2) per
    pick); here g is updated by the rows whose coverage the pick raises, the same sums regrouped (picks equal
    up to float rounding of near-ties)."""
    if combine not in ("multi", "add"):
        raise ValueError(f"combine must be 'multi' or 'add', got {combine!r}")
    n = saliency.shape[0]
    keep = min(int(keep), n)
    x = F.normalize(features.float(), dim=-1)
    sim = x @ x.T
    weight = saliency.float() ** alpha
    covered = sim.new_zeros(n)
    coverage = sim.clamp(min=0).sum(0)  # g_j with nothing picked
    available = torch.ones(n, dtype=torch.bool, device=sim.device)
    picks = torch.empty(keep, dtype=torch.long, device=sim.device)
    for i in range(keep):
        gain = coverage * weight if combine == "multi" else coverage + weight
        j = int(gain.masked_fill(~available, float("-inf")).argmax())
        picks[i] = j
        available[j] = False
        raised = sim[j] > covered  # only these rows' terms change
        rows = sim[raised]
        coverage = coverage - ((rows - covered[raised, None]).clamp(min=0)
                               - (rows - sim[j, raised, None]).clamp(min=0)).sum(0)
        covered = torch.maximum(covered, sim[j])
    return picks


__all__ = ["cdpruner_relevance", "conditional_dpp", "greedy_dpp_map", "holov_crops", "importance_then_diversity",
           "region_quotas", "saliency_coverage"]
