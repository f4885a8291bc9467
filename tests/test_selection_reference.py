"""The selection primitives and the vispruner / cdpruner / holov / scope scorers against slow references written
separately from the released code's formulas (VisPruner, CDPruner, HoloV, SCOPE): plain Python loops in float64,
the DPP by brute-force log-determinants. Same features in, same indices out; end to end on tiny LLaVA and
Qwen2.5-VL models, with the signals read from the eager tower (a padded batch whose second sample holds two
images)."""

from __future__ import annotations

import math

import pytest
import torch

from oracle import decoder_inputs, instruction_positions, visual_positions
from test_methods_visionzip import eager_facts
from test_nuwa import _case, routed, split_budget
from visroute import RoutingConfig, Stage
from visroute.scoring.selection import (
    conditional_dpp,
    greedy_dpp_map,
    holov_crops,
    importance_then_diversity,
    region_quotas,
    saliency_coverage,
)


def _cos(x: torch.Tensor) -> list[list[float]]:
    x = x.double()
    n = x.shape[0]
    norms = [math.sqrt(float(x[i] @ x[i])) for i in range(n)]
    return [[float(x[i] @ x[j]) / (norms[i] * norms[j]) for j in range(n)] for i in range(n)]


# ---- slow references -------------------------------------------------------------------------------------------
def slow_vispruner(att, x, keep, important, step=8):
    """VisPruner's encode_images for one image, with lists."""
    sim = _cos(x)
    ranked = sorted(range(len(att)), key=lambda t: (-float(att[t]), t))
    picked, residual = ranked[:important], ranked[important:]
    diverse = keep - important
    if diverse == 0:
        return picked
    while len(residual) > diverse:
        r = min(step, len(residual) - diverse)
        a, b = residual[0::2], residual[1::2]
        s = [max(sim[i][j] for j in b) for i in a]
        by_s = sorted(range(len(a)), key=lambda i: (-s[i], i))
        residual = [a[i] for i in by_s[r:]] + b
    return picked + residual


def slow_dpp(kernel: torch.Tensor, keep: int) -> list[int]:
    """Greedy MAP by brute force: each step adds the token maximising log det of the kernel on the picked set."""
    k = kernel.double()
    picked: list[int] = []
    for _ in range(keep):
        best, best_val = None, -math.inf
        for j in range(k.shape[0]):
            if j in picked:
                continue
            idx = picked + [j]
            sign, logdet = torch.linalg.slogdet(k[idx][:, idx])
            val = float(logdet) if sign > 0 else -math.inf
            if val > best_val:
                best, best_val = j, val
        picked.append(best)
    return picked


def slow_relevance(visual: torch.Tensor, text: torch.Tensor) -> list[float]:
    rel = []
    for v in visual.double():
        cs = [float(v @ t) / math.sqrt(float(v @ v) * float(t @ t)) for t in text.double()]
        rel.append(sum(cs) / len(cs))
    lo, hi = min(rel), max(rel)
    return [(r - lo + 1e-6) / (hi - lo) for r in rel]


def slow_holov(att, x, keep, crops, alpha=1.0, beta=0.09):
    """HoloV's per-crop quotas for one image, with lists (no overflow in these cases)."""
    n = len(att)
    att = [float(a) for a in att]
    size, extra = divmod(n, crops)
    runs, start = [], 0
    for p in range(crops):
        m = size + (1 if p < extra else 0)
        runs.append(list(range(start, start + m)))
        start += m
    x = x.double()
    scores = []
    for run in runs:
        m = len(run)
        if m <= 1:
            scores.append(att[run[0]])
            continue
        f = [x[t] / (x[t].norm() + 1e-6) for t in run]
        s = [[0.0 if i == j else float(f[i] @ f[j]) for j in range(m)] for i in range(m)]
        mean = [sum(row) / (m - 1) for row in s]
        var = [sum((s[i][j] - mean[i]) ** 2 for j in range(m)) / (m - 1) for i in range(m)]
        scaled = [att[t] * 1e3 for t in run]
        factor = (sum(abs(v) for v in scaled) / m) / (sum(abs(v) for v in var) / m + 1e-6)
        scores.append(sum(alpha * scaled[i] + beta * var[i] * factor for i in range(m)) / m)
    total = sum(scores) + 1e-6
    w = [s / total for s in scores]
    quota = [math.floor(v * keep) for v in w]
    for p in sorted(range(crops), key=lambda p: (-w[p], p))[: keep - sum(quota)]:
        quota[p] += 1
    out = []
    for run, q in zip(runs, quota):
        assert q <= len(run)
        out += sorted(run, key=lambda t: (-att[t], t))[:q]
    return out


def slow_scope(sal, x, keep, alpha=1.0):
    sim = _cos(x)
    n = len(sal)
    covered = [0.0] * n
    picked = []
    for _ in range(keep):
        best, best_val = None, -math.inf
        for j in range(n):
            if j in picked:
                continue
            gain = sum(max(0.0, sim[i][j] - covered[i]) for i in range(n)) * float(sal[j]) ** alpha
            if gain > best_val:
                best, best_val = j, gain
        picked.append(best)
        covered = [max(covered[i], sim[best][i]) for i in range(n)]
    return picked


# ---- the primitives --------------------------------------------------------------------------------------------
def _random(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g), torch.randn(n, d, generator=g)


@pytest.mark.parametrize("n, keep, important", [(40, 12, 6), (41, 12, 9), (30, 10, 0), (25, 25, 5), (33, 7, 7)])
def test_importance_then_diversity_equals_the_released_procedure(n, keep, important):
    att, x = _random(n, 16, n + keep)
    got = importance_then_diversity(att, x, keep, important).tolist()
    assert got == slow_vispruner(att, x, keep, important)
    assert len(set(got)) == keep


@pytest.mark.parametrize("n, keep", [(20, 8), (30, 12)])
def test_greedy_dpp_map_equals_brute_force_log_determinants(n, keep):
    _, x = _random(n, n + 4, 3 * n)  # full-rank kernel
    rel = torch.rand(n, generator=torch.Generator().manual_seed(n)) + 0.05
    xn = torch.nn.functional.normalize(x, dim=-1)
    kernel = rel[:, None] * (xn @ xn.T) * rel[None, :]
    assert greedy_dpp_map(kernel, keep).tolist() == slow_dpp(kernel, keep)
    assert conditional_dpp(x, rel, keep).tolist() == slow_dpp(kernel, keep)


def test_dpp_past_the_rank_continues_by_relevance():
    _, x = _random(24, 4, 5)  # rank 4: the determinant vanishes after 4 picks
    rel = torch.linspace(0.1, 1.0, 24)
    got = conditional_dpp(x, rel, 10).tolist()
    xn = torch.nn.functional.normalize(x, dim=-1)
    assert got[:4] == slow_dpp(rel[:, None] * (xn @ xn.T) * rel[None, :], 4)
    rest = [t for t in sorted(range(24), key=lambda t: -float(rel[t])) if t not in got[:4]][:6]
    assert got[4:] == rest


@pytest.mark.parametrize("n, keep", [(36, 8), (50, 12), (25, 6)])
def test_region_quotas_equal_the_released_procedure(n, keep):
    att, x = _random(n, 12, n * keep)
    crops = holov_crops(n, keep)
    assert sorted(region_quotas(att, x, keep, crops).tolist()) == sorted(slow_holov(att, x, keep, crops))


def test_holov_crop_rule_matches_the_released_llava_setting():
    assert holov_crops(576, 64) == 16


def test_region_quotas_fill_a_shortfall_and_keep_exactly_k():
    att = torch.tensor([9.0, 9.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.1])
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    got = region_quotas(att, x, 6, crops=5)  # crop 0 (2 tokens) takes most of the quota: overflow
    assert len(set(got.tolist())) == 6


@pytest.mark.parametrize("n, keep", [(30, 8), (45, 10)])
def test_saliency_coverage_equals_the_released_greedy(n, keep):
    sal, x = _random(n, 8, 7 * n)
    assert saliency_coverage(sal, x, keep).tolist() == slow_scope(sal, x, keep)
    assert saliency_coverage(sal, x, keep, alpha=2.0).tolist() == slow_scope(sal, x, keep, alpha=2.0)


# ---- the scorers end to end, on tiny LLaVA and Qwen2.5-VL ------------------------------------------------------
@pytest.fixture(params=["llava", "qwen2.5"])
def case(request):
    return _case(request.param)


def _projected(case):
    """Per image (batch order): the decoder input embeddings of its visual tokens; and per sample the embeddings
    of its instruction tokens."""
    embeds = decoder_inputs(case.eager, case.inputs)[0]
    per_image, texts = [], []
    instr = instruction_positions(case.inputs, case.token)
    for b, (sample, p) in enumerate(zip(case.grids, visual_positions(case.inputs["input_ids"], case.token))):
        offset = 0
        for r, c in sample:
            per_image.append(embeds[b, p[offset : offset + r * c]])
            offset += r * c
        texts.append(embeds[b, instr[b]])
    return per_image, texts


def _expected(case, keep, pick):
    """Per sample, the sorted kept indices when `pick(image index, sample, offset, size, k)` selects per image."""
    out, i = [], 0
    for b, sample in enumerate(case.grids):
        kept, offset = [], 0
        for (r, c), k in zip(sample, split_budget(keep, [r * c for r, c in sample])):
            kept += [offset + t for t in pick(i, b, offset, r * c, k)]
            offset += r * c
            i += 1
        out.append(sorted(kept))
    return out


def _selected(case, scorer, keep, **options):
    _, rec = routed(case, RoutingConfig("prune", scorer, [Stage(0, keep)], scorer_options=options))
    return [sorted(rec.stages[0].selected[b].tolist()) for b in range(len(case.grids))]


@pytest.mark.parametrize("keep, ratio", [(9, 0.5), (12, 0.75)])
def test_vispruner_scorer_equals_the_released_procedure(case, keep, ratio, monkeypatch):
    cls, xs, _ = eager_facts(case, monkeypatch)  # LLaVA: tower features; Qwen: decoder input embeddings
    want = _expected(case, keep, lambda i, b, o, n, k: slow_vispruner(cls[i], xs[i], k, int(k * ratio)))
    assert _selected(case, "vispruner", keep, important_ratio=ratio) == want


@pytest.mark.parametrize("keep", [6, 11])
def test_cdpruner_scorer_equals_the_released_procedure(case, keep):
    images, texts = _projected(case)
    rel = []
    for b, sample in enumerate(case.grids):  # relevance min-max over the sample's visual tokens
        joined = slow_relevance(torch.cat(images[len(rel):len(rel) + len(sample)]), texts[b])
        offset = 0
        for r, c in sample:
            rel.append(torch.tensor(joined[offset : offset + r * c], dtype=torch.float64))
            offset += r * c

    def pick(i, b, o, n, k):
        x = torch.nn.functional.normalize(images[i].double(), dim=-1)
        return slow_dpp(rel[i][:, None] * (x @ x.T) * rel[i][None, :], k)

    assert _selected(case, "cdpruner", keep) == _expected(case, keep, pick)


@pytest.mark.parametrize("keep", [6, 10])
def test_holov_scorer_equals_the_released_procedure(case, keep, monkeypatch):
    cls, _, _ = eager_facts(case, monkeypatch)
    images, _ = _projected(case)
    want = _expected(case, keep, lambda i, b, o, n, k: slow_holov(cls[i], images[i], k, holov_crops(n, k)))
    assert _selected(case, "holov", keep) == want


@pytest.mark.parametrize("keep", [6, 10])
def test_scope_scorer_equals_the_released_greedy(case, keep, monkeypatch):
    cls, xs, _ = eager_facts(case, monkeypatch)
    want = _expected(case, keep, lambda i, b, o, n, k: slow_scope(cls[i], xs[i], k))
    assert _selected(case, "scope", keep) == want
