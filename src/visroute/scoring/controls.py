"""Control scorers: they ignore what the model computes, so a real signal has to beat them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from visroute.scoring import option, register
from visroute.scoring.base import Scorer, StageContext

_P = 2_147_483_647  # 2**31 - 1: products of two residues fit in int64


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A few rounds of a multiplicative hash on int64 residues mod 2**31-1."""
    for mult in (48271, 69621, 16807):
        x = (x * mult + 12345) % _P
        x = x ^ (x >> 11)
    return x


def sample_keys(ctx: StageContext) -> torch.Tensor:
    """(B,) a key per sample that depends only on its own (unpadded) token ids, so a sample draws the same
    random numbers whatever batch it is in."""
    b = ctx.valid.shape[0]
    if ctx.input_ids is None:
        return torch.zeros(b, dtype=torch.long, device=ctx.valid.device)
    valid = ctx.valid[:, :-1].to(ctx.input_ids.device)
    rank = valid.long().cumsum(1)
    per_token = _mix((ctx.input_ids.long() % _P) * 1_000_003 % _P + rank) * valid
    return _mix(per_token.sum(1) % _P).to(ctx.valid.device)


@register
class RandomScorer(Scorer):
    """Uniform random ranking, seeded and reproducible: the score of visual token j of a sample is a hash of
    (seed, stage index, the sample's token ids, j), so it does not depend on the batch the sample is in."""

    name = "random"
    description = "seeded uniform random ranking (control)"
    before_decoder = True

    @dataclass(frozen=True)
    class Options:
        seed: int = option(0, "random seed")

    def score(self, ctx: StageContext) -> torch.Tensor:
        nv = ctx.layout.positions.shape[1]
        j = torch.arange(nv, device=ctx.valid.device)[None, :]
        base = _mix(torch.tensor(self.options.seed * 7919 + ctx.stage_index, device=ctx.valid.device) % _P)
        keys = _mix((sample_keys(ctx) + base) % _P)
        return _mix((keys[:, None] * 31 + j) % _P).float() / _P


def split_budget(total: int, sizes: list[int]) -> list[int]:
    """`total` split across parts proportionally to `sizes` (largest remainder; ties to the earlier part),
    never more than a part's size."""
    n = sum(sizes)
    if n == 0:
        return [0] * len(sizes)
    total = min(total, n)
    shares = [total * s // n for s in sizes]
    remainders = sorted(range(len(sizes)), key=lambda i: (-(total * sizes[i] % n), i))
    for i in remainders[: total - sum(shares)]:
        shares[i] += 1
    return shares


def _lattice_lines(size: int, count: int) -> torch.Tensor:
    """`count` evenly spaced indices in 0..size-1: the centres of `count` equal strides."""
    return ((torch.arange(count, dtype=torch.float64) + 0.5) * size / count).floor().long()


def lattice_scores(rows: int, cols: int, keep: int) -> torch.Tensor:
    """(rows*cols,) scores over a grid, row-major, whose top `keep` form an evenly spread subset.

    A lattice of r x c >= keep points, r/c close to rows/cols, at the stride centres. Every token scores minus its
    squared distance (in grid cells) to the nearest lattice point, so the lattice points come first and, when
    some of them are not candidates, the tokens nearest to the lattice come next. When r*c > keep, the keep
    lattice points at evenly strided places of the lattice's row-major order get a half-point bonus."""
    n = rows * cols
    if keep <= 0:
        return torch.full((n,), -float(rows * rows + cols * cols + 1))
    if keep >= n:
        return torch.zeros(n)
    r = min(rows, max(1, round((keep * rows / cols) ** 0.5)))
    c = min(cols, -(-keep // r))
    r = min(rows, -(-keep // c))
    lat_rows, lat_cols = _lattice_lines(rows, r), _lattice_lines(cols, c)
    d_row = (torch.arange(rows)[:, None] - lat_rows[None, :]).abs().min(1).values
    d_col = (torch.arange(cols)[:, None] - lat_cols[None, :]).abs().min(1).values
    scores = -(d_row[:, None] ** 2 + d_col[None, :] ** 2).double()
    chosen = _lattice_lines(r * c, keep)  # evenly strided among the r*c lattice points
    scores[lat_rows[chosen // c], lat_cols[chosen % c]] += 0.5
    return scores.flatten()


@register
class UniformScorer(Scorer):
    """Spatially uniform control: an evenly spread subset of each image's grid, whatever the content. The
    stage's keep count k of a sample is split across its images in proportion to their tokens (largest
    remainder); image i then keeps a lattice of k_i tokens at the centres of equal row and column strides
    (`lattice_scores`). Deterministic; it uses no model state, so a layer-0 stage prunes before the decoder.
    Images without a grid are treated as one row; a video's frames are stacked as rows. Under prune after an
    earlier stage, lattice points that are no longer candidates give way to the candidates nearest to them."""

    name = "uniform"
    description = "spatially uniform control: an evenly strided lattice over each image's grid"
    before_decoder = True

    def score(self, ctx: StageContext) -> torch.Tensor:
        budget = ctx.budget().tolist()
        out = torch.zeros(ctx.layout.positions.shape, dtype=torch.float64)
        # A handful of small index computations per image: cheap next to any forward pass.
        for b, spans in enumerate(ctx.layout.images):
            shares = split_budget(int(budget[b]), [span.length for span in spans])
            for span, share in zip(spans, shares):
                if span.rows is None or span.cols is None:
                    rows, cols = 1, span.length
                else:
                    rows, cols = span.frames * span.rows, span.cols
                out[b, span.offset : span.offset + span.length] = lattice_scores(rows, cols, share)
        return out.float().to(ctx.valid.device)


@register
class OracleScorer(Scorer):
    """Oracle control: keeps the tokens with the highest given relevance. Per call, a relevance over each
    sample's visual tokens is passed with `router.call_options(relevance=R)`: R is a (B, Nv) tensor (Nv = the
    batch's largest visual-token count; padding entries ignored) or a list of per-sample 1-D tensors, each as
    long as that sample's visual tokens (the testbed and box-annotated benchmarks provide them). The score is
    the relevance itself: with a 0/1 relevance and a budget that covers the relevant tokens, every relevant
    token is kept."""

    name = "oracle"
    description = "oracle control: keeps the tokens with the highest relevance given per call (call_options(relevance=...))"
    call_inputs = ("relevance",)
    before_decoder = True

    def score(self, ctx: StageContext) -> torch.Tensor:
        relevance = ctx.extras.get("relevance")
        if relevance is None:
            raise ValueError(
                "The oracle scorer needs a relevance per visual token: call the model within "
                "`router.call_options(relevance=R)`, R a (batch, visual tokens) tensor or a list of 1-D tensors"
            )
        counts = ctx.layout.counts.tolist()
        b, nv = ctx.layout.positions.shape
        if torch.is_tensor(relevance):
            if relevance.dim() != 2 or tuple(relevance.shape) != (b, nv):
                raise ValueError(
                    f"oracle relevance has shape {tuple(relevance.shape)}; this batch needs ({b}, {nv}) "
                    f"(its samples hold {counts} visual tokens)"
                )
            return relevance.detach().float().to(ctx.valid.device)
        rows = list(relevance)
        if len(rows) != b or any(torch.as_tensor(r).numel() != n for r, n in zip(rows, counts)):
            given = [torch.as_tensor(r).numel() for r in rows]
            raise ValueError(f"oracle relevance lengths {given} do not match the samples' visual tokens {counts}")
        out = torch.zeros(b, nv, dtype=torch.float32, device=ctx.valid.device)
        for i, r in enumerate(rows):
            out[i, : counts[i]] = torch.as_tensor(r).detach().float().flatten().to(out.device)
        return out


def pool_blocks(rows: int, cols: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A partition of a rows x cols grid (row-major) into `count` near-equal rectangular blocks, the pooling of
    the pooling control: (block of each cell (rows*cols,) long, the centre cell of each block (count,) long),
    blocks numbered row-major.

    r block-rows (r / (count / r) close to rows / cols), split at floor(i * rows / r); the count is spread over the
    block-rows as evenly as possible (largest remainder, extra blocks to the upper rows) and block-row i is split
    into its c_i blocks at floor(j * cols / c_i). When count = r x c with r | rows and c | cols this is plain
    r x c average pooling (LLaVA-1.5's 24 x 24 grid at 64 tokens: 8 x 8 blocks of 3 x 3; the testbed's 12 x 12 at
    36: 6 x 6 blocks of 2 x 2); otherwise the blocks differ by at most one cell a side, and the number of
    tokens is exactly `count` (so that the control matches a budget's token count). A block's centre cell is
    ((top + bottom - 1) // 2, (left + right - 1) // 2)."""
    n = rows * cols
    count = max(1, min(int(count), n))
    r = min(rows, count, max(-(-count // cols), round((count * rows / cols) ** 0.5)))
    per_row = [count // r + (i < count % r) for i in range(r)]
    block = torch.empty(n, dtype=torch.long)
    centres = []
    row_edges = [i * rows // r for i in range(r + 1)]
    for i, c in enumerate(per_row):
        top, bottom = row_edges[i], row_edges[i + 1]
        col_edges = [j * cols // c for j in range(c + 1)]
        for j in range(c):
            left, right = col_edges[j], col_edges[j + 1]
            cells = (torch.arange(top, bottom)[:, None] * cols + torch.arange(left, right)[None, :]).flatten()
            block[cells] = len(centres)
            centres.append(((top + bottom - 1) // 2) * cols + (left + right - 1) // 2)
    return block, torch.tensor(centres, dtype=torch.long)


def image_grid(span) -> tuple[int, int]:
    """(rows, cols) of an image span's tokens for the spatial controls: a video's frames stacked as rows; an
    image without a grid (or whose tokens are not rows x cols, e.g. with newline tokens) as one row."""
    if span.rows is None or span.cols is None or span.frames * span.rows * span.cols != span.length:
        return 1, span.length
    return span.frames * span.rows, span.cols


@register
class PoolScorer(Scorer):
    """The pooling control's selection: the stage's keep count k of a sample is split across its images in
    proportion to their tokens (largest remainder); image i keeps the centre token of each of the k_i blocks of
    `pool_blocks`. Paired with the `pool_average` merge at layer 0, each kept token enters the decoder as the
    mean of its block: the visual token grid average-pooled to the budget's count. Deterministic, uses no
    model state.

    Departure from feeding a downsampled image (VTC-Bench's control): each pooled token keeps the rotary position
    of its block's centre and the text keeps its own, as every pruning method here keeps its tokens' positions, so
    that pooling differs from selection in the tokens' content only; a downsampled image would instead give k
    contiguous positions and move the text k - N positions earlier. The effect of that difference is not measured."""

    name = "pool"
    description = "pooling control: the centre token of each pooling block (pair with merge pool_average at layer 0)"
    before_decoder = True

    def score(self, ctx: StageContext) -> torch.Tensor:
        budget = ctx.budget().tolist()
        out = torch.zeros(ctx.layout.positions.shape)
        for b, spans in enumerate(ctx.layout.images):
            shares = split_budget(int(budget[b]), [span.length for span in spans])
            for span, share in zip(spans, shares):
                if share > 0:
                    _, centres = pool_blocks(*image_grid(span), share)
                    out[b, span.offset + centres] = 1.0
        return out.to(ctx.valid.device)
