"""Nüwa (arXiv 2602.02951, "Mending the Spatial Integrity Torn by VLM Token Pruning"), as its released code
(github.com/Man-PaperRejected/Nuwa) does it: the stage-1 scorer `nuwa` (vision-tower attention with the 2x2
regional rule) and the merge `nuwa` ("region cohesion": pillar tokens kept raw, the others receiving a similarity-
and distance-weighted sum of their neighbours). Stage 2 is `last_token_attention` scored one layer before the
stage acts (`Stage(16, 16, score_layer=15)` on LLaVA-1.5; Qwen2.5-VL: `Stage(15, k, score_layer=14)` with
`queries=3, heads="max"`); `visroute.methods` builds the whole schedule at each tier.

Where the paper and the released code disagree, this follows the code:
* selection and the pillar split use the [CLS] attention alone (the paper and its figure add an "information
  capacity" / L2-norm factor; in the code that exists only in an ablation class);
* stage 2 is last-token attention at a middle layer (the paper describes text-embedding similarity).
Where the code has quirks, this does not copy them: the budget is split per image, in proportion to each image's
candidates (the code gives every image of a tower call ceil(K1 / B), B the images in the call, so a batch of B
samples shares one sample's budget); nothing assumes a 24 x 24 grid, sequence position 35 or batch size 1; the
tower's attention is one [CLS] row from a hook (the code switches every CLIP layer to eager attention and keeps
every 577 x 577 map); the Qwen variant's similarity features are put in token order (the code leaves them in the
ViT's window order while the distances and the merged features are in token order, pairing the wrong tokens)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from visroute.merge import Merge, register_merge
from visroute.scoring import option, register
from visroute.scoring.base import StageContext
from visroute.scoring.vision import VisionCLSAttention
from visroute.tensors import CHUNK_ELEMENTS, compact_index, gather_rows


# ---- shared helpers ----------------------------------------------------------------------------------------------
@dataclass
class TokenGrid:
    """Where each visual token of each sample sits: (B, Nv) long tensors (0 for padding)."""

    image: torch.Tensor  # index of its image within the sample (-1 for padding)
    frame: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    rows: torch.Tensor  # its image's grid rows and cols
    cols: torch.Tensor

    @property
    def block(self) -> torch.Tensor:
        """(B, Nv) a 2x2 region id, unique within a sample (odd grids end in partial regions)."""
        per_frame = ((self.rows + 1) // 2) * ((self.cols + 1) // 2)
        inside = (self.row // 2) * ((self.cols + 1) // 2) + self.col // 2
        return (self.image * 4096 + self.frame) * per_frame.amax().clamp(min=1) + inside


def token_grid(ctx: StageContext, who: str) -> TokenGrid:
    """The grid position of every visual token (built once per stage from the layout's image spans)."""
    shape = ctx.layout.positions.shape
    out = {k: torch.zeros(shape, dtype=torch.long) for k in ("frame", "row", "col", "rows", "cols")}
    image = torch.full(shape, -1, dtype=torch.long)
    for b, spans in enumerate(ctx.layout.images):
        for i, span in enumerate(spans):
            if span.rows is None or span.cols is None:
                raise ValueError(f"{who} needs each image's patch grid; this model's visual tokens form none "
                                 "(e.g. a kept [CLS] token)")
            sl = slice(span.offset, span.offset + span.length)
            t = torch.arange(span.length)
            per = span.rows * span.cols
            image[b, sl] = i
            out["frame"][b, sl] = t // per
            out["row"][b, sl] = (t % per) // span.cols
            out["col"][b, sl] = t % span.cols
            out["rows"][b, sl] = span.rows
            out["cols"][b, sl] = span.cols
    device = ctx.layout.positions.device
    return TokenGrid(image=image.to(device), **{k: v.to(device) for k, v in out.items()})


def rank_within(group: torch.Tensor, score: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """(B, N) long: the rank (0 = best) of each eligible entry among the eligible entries of its group by `score`,
    descending, ties to the lower index; ineligible entries get N. Batched, no loop."""
    b, n = score.shape
    s = torch.where(eligible, score.float(), torch.full_like(score, float("-inf"), dtype=torch.float32))
    by_score = torch.sort(s, dim=1, descending=True, stable=True).indices
    sentinel = group.max() + 1 if group.numel() else 0
    g = torch.where(eligible, group, torch.full_like(group, int(sentinel))).gather(1, by_score)
    by_group = torch.sort(g, dim=1, stable=True).indices
    order = by_score.gather(1, by_group)  # grouped, each group by score descending
    grouped = g.gather(1, by_group)
    pos = torch.arange(n, device=score.device).expand(b, n)
    starts = torch.ones_like(grouped, dtype=torch.bool)
    starts[:, 1:] = grouped[:, 1:] != grouped[:, :-1]
    first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(1).values
    rank_sorted = torch.where(eligible.gather(1, order), pos - first, torch.full_like(pos, n))
    return torch.empty_like(rank_sorted).scatter_(1, order, rank_sorted)


def split_per_image(image: torch.Tensor, eligible: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Each sample's `total` (B,) split over its images in proportion to their eligible tokens (largest remainder,
    exact integers; ties to the earlier image). Returns (B, Nv): the share of each token's image."""
    b = image.shape[0]
    n_img = int(image.max()) + 1 if image.numel() and int(image.max()) >= 0 else 1
    idx = image.clamp(min=0)
    counts = torch.zeros(b, n_img, dtype=torch.long, device=image.device).scatter_add_(
        1, idx, (eligible & (image >= 0)).long())
    whole = counts.sum(1, keepdim=True).clamp(min=1)
    numer = total.to(image.device)[:, None].long() * counts
    base, rest = numer // whole, numer % whole
    left = total.to(image.device).long() - base.sum(1)
    order = torch.sort(rest, dim=1, descending=True, stable=True).indices
    bonus = torch.zeros_like(base).scatter_(1, order, (torch.arange(n_img, device=image.device)[None, :]
                                                        < left[:, None]).long())
    share = torch.minimum(base + bonus, counts)
    return share.gather(1, idx)


def group_quantile(values: torch.Tensor, group: torch.Tensor, member: torch.Tensor, q: float) -> torch.Tensor:
    """(B, N): for each entry, the q-quantile (linear interpolation, as torch.quantile) of `values` over the
    members of its group (per row); NaN where its group has no member."""
    b, n = values.shape
    v = torch.where(member, values.float(), torch.full_like(values, float("inf"), dtype=torch.float32))
    by_value = torch.sort(v, dim=1, stable=True).indices
    sentinel = int(group.max()) + 1 if group.numel() else 0
    g = torch.where(member, group, torch.full_like(group, sentinel)).gather(1, by_value)
    by_group = torch.sort(g, dim=1, stable=True).indices
    sorted_v = v.gather(1, by_value).gather(1, by_group)  # per group ascending, members first
    n_groups = sentinel + 1
    counts = torch.zeros(b, n_groups, dtype=torch.long, device=values.device).scatter_add_(
        1, torch.where(member, group, torch.full_like(group, sentinel)), torch.ones_like(group))
    counts[:, sentinel] = 0
    starts = counts.cumsum(1) - counts  # members sort before the sentinel group, groups ascending
    gid = group.clamp(min=0, max=sentinel)
    count, start = counts.gather(1, gid), starts.gather(1, gid)
    ranks = torch.tensor(q, dtype=torch.float32, device=values.device) * (count - 1).clamp(min=0).float()
    below, above = ranks.long(), ranks.ceil().long()
    v_below = sorted_v.gather(1, (start + below).clamp(max=n - 1))
    v_above = sorted_v.gather(1, (start + above).clamp(max=n - 1))
    out = torch.lerp(v_below, v_above, ranks - below.float())
    return torch.where(count > 0, out, torch.full_like(out, float("nan")))


def per_token(flat: torch.Tensor, valid: torch.Tensor, who: str, what: str) -> torch.Tensor:
    """Flat per-visual-token values of one tower call (batch order) -> (B, Nv, ...) (0 at padding)."""
    if flat.shape[0] != int(valid.sum()):
        raise ValueError(f"{who}: the vision tower gave {what} for {flat.shape[0]} tokens but the batch holds "
                         f"{int(valid.sum())} visual tokens")
    out = flat.new_zeros((*valid.shape, *flat.shape[1:]))
    out[valid.to(flat.device)] = flat
    return out.to(valid.device)


def above_the_rest(scores: torch.Tensor, valid: torch.Tensor, levels: list[torch.Tensor]) -> torch.Tensor:
    """Scores whose top is `levels[0]`, then `levels[1]`, ... then everything else, each tier ranked by `scores`
    within itself: the engine's top-k then keeps exactly a selection procedure's picks. Per sample, finite."""
    s = torch.where(valid, scores.float(), torch.zeros_like(scores, dtype=torch.float32))
    big = torch.finfo(torch.float32).max
    hi = torch.where(valid, s, torch.full_like(s, -big)).amax(1, keepdim=True)
    lo = torch.where(valid, s, torch.full_like(s, big)).amin(1, keepdim=True)
    step = torch.where(valid.any(1, keepdim=True), hi - lo, torch.zeros_like(hi)) + 1.0
    out = s.clone()
    for i, level in enumerate(levels):
        out = torch.where(level & valid, s + step * (len(levels) - i), out)
    return out


class TowerCapture:
    """What hooks on the vision tower pass on, kept from the latest tower call until the next prefill begins
    (under `generate` the tower runs before the prefill), then taken by it."""

    def __init__(self, who: str):
        self.who = who
        self.handles: list = []
        self._fresh: dict[str, torch.Tensor] = {}
        self._current: dict[str, torch.Tensor] = {}

    def sink(self, name: str) -> Callable[[torch.Tensor], None]:
        def put(value: torch.Tensor) -> None:
            self._fresh[name] = value
        return put

    def add(self, handles) -> None:
        self.handles += list(handles or [])

    def begin(self) -> None:
        self._current, self._fresh = self._fresh, {}

    def get(self, name: str) -> torch.Tensor:
        if name not in self._current:
            raise ValueError(f"{self.who}: the vision tower did not run for this call (image features passed in "
                             "pre-computed?); it needs pixel values")
        return self._current[name]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self._fresh, self._current = [], {}, {}


class TowerMerge(Merge):
    """A merge that reads the vision tower through hooks: `tower_hooks` adds what it needs; the features it merges
    are the projector's input where the family has one to hook (LLaVA: then projected by `emit`), else the
    decoder input embeddings (Qwen, whose merger is its projector)."""

    def __init__(self, **options: Any):
        super().__init__(**options)
        self._capture = TowerCapture(f"The {self.name} merge")
        self._adapter = None
        self._tower_space = False

    def tower_hooks(self, adapter, capture: TowerCapture) -> None:
        raise NotImplementedError

    def attach(self, adapter) -> None:
        _needs(adapter, "hook_vision_scores")
        self.tower_hooks(adapter, self._capture)
        projector = adapter.hook_projector_input(self._capture.sink("x"))
        self._tower_space = projector is not None
        self._capture.add(projector)
        self._adapter = adapter

    def detach(self) -> None:
        self._capture.remove()
        self._adapter = None

    def begin_prefill(self) -> None:
        self._capture.begin()

    def captured(self, name: str, valid: torch.Tensor) -> torch.Tensor:
        """(B, Nv, ...) fp32: what the hook `name` passed on for this prefill's tower call, per visual token."""
        return per_token(self._capture.get(name).float(), valid, f"The {self.name} merge", name)

    def features(self, ctx: StageContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(the features merged (B, Nv, D') fp32, the decoder input embeddings (B, Nv, D))."""
        embeds = gather_rows(ctx.inputs_embeds, ctx.layout.positions)
        x = self.captured("x", ctx.layout.valid) if self._tower_space else embeds
        return x.to(ctx.layout.valid.device).float(), embeds

    def emit(self, embeds: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The decoder input embeddings with the kept tokens `index` (B, K) (real where `valid`) replaced by
        `rows` (B, K, D') of merged features, projected first when they are tower features."""
        if self._tower_space:
            rows = self._adapter.project_visual(rows).float()
        out = embeds.clone()
        sample = torch.arange(index.shape[0], device=index.device)[:, None].expand_as(index)
        out[sample[valid], index[valid]] = rows[valid].to(out.dtype)
        return out


# ---- stage 1: the regional rule ----------------------------------------------------------------------------------
def regional_picks(scores: torch.Tensor, grid: TokenGrid, candidates: torch.Tensor, budget: torch.Tensor,
                   top_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nüwa's separation-and-alignment rule per image: each 2x2 region offers its top `top_n` candidates by
    score; of those, the image keeps its share of the budget with the highest scores. Returns (picks (B, Nv),
    regional (B, Nv): the offered tokens)."""
    regional = candidates & (rank_within(grid.block, scores, candidates) < top_n)
    share = split_per_image(grid.image, candidates, budget)
    picks = regional & (rank_within(grid.image, scores, regional) < share)
    return picks, regional


@register
class NuwaRegional(VisionCLSAttention):
    """Nüwa's stage 1 (released code, `CLIPVisionTower_Nuwa`): the vision tower's [CLS] attention to each patch
    at the layer the projector reads, summed over heads (as `vision_cls_attention`; Qwen2.5-VL, without [CLS]:
    the attention each merged token receives at the last ViT block, which ranks the tokens of an image as the
    released `attn.mean(heads).sum(queries)` does), then the regional rule: the grid is cut into 2x2 regions
    (odd grids end in partial regions, as the Qwen code's padding does), each region offers its `top_n` best
    tokens, and each image keeps, of the offered tokens, the best of its share of the stage's keep.

    The share: a sample's keep split over its images in proportion to their candidates (largest remainder). If
    an image offers fewer tokens than its share (keep > regions x top_n), its remaining slots go to the sample's
    best other candidates (the released code keeps fewer tokens). Returned scores put the kept tokens above the
    others, so the engine's top-k keeps exactly them."""

    name = "nuwa"
    description = "Nüwa stage 1: vision-tower [CLS] attention, top-n per 2x2 region, then the best per image"
    before_decoder = True

    @dataclass(frozen=True)
    class Options(VisionCLSAttention.Options):
        top_n: int = option(1, "tokens each 2x2 region may offer (Nüwa's LLaVA-1.5 tiers 64 / 128 / 192: 1 / 2 / 3)")

        def __post_init__(self):
            if not 1 <= self.top_n <= 4:
                raise ValueError(f"top_n must be 1..4 (a 2x2 region has 4 tokens), got {self.top_n}")

    def score(self, ctx: StageContext) -> torch.Tensor:
        raw = super().score(ctx)
        valid = ctx.layout.valid.to(raw.device)
        grid = token_grid(ctx, "The nuwa scorer")
        candidates = ctx.candidates.to(raw.device) & valid
        picks, _ = regional_picks(raw, grid, candidates, ctx.budget(), self.options.top_n)
        return above_the_rest(raw, valid, [picks])


# ---- the aggregation step ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NuwaConstants:
    """The constants of one released variant of Nüwa's aggregation."""

    distance: float | None  # squared radius of the distance penalty, in grid units (LLaVA: 280)
    radius_fraction: float | None  # or: the radius as a fraction of the even-padded grid's diagonal (Qwen: 0.8)
    pillar_quantile: float
    self_weight_one: bool  # LLaVA: the self weight is overwritten with 1 after normalising (not convex)
    features: tuple[float, float]  # first and last tower layer averaged, as fractions of the tower's depth


VARIANTS = {
    # clip_encoder.py: hidden_states[16:25] of 24 layers (outputs of layers 15..23), DIST=280, percentile 0.55
    "llava": NuwaConstants(distance=280.0, radius_fraction=None, pillar_quantile=0.55, self_weight_one=True,
                           features=(15 / 24, 23 / 24)),
    # qwen2_5vl_nuwa.py: block outputs 7..23 of 32 through the merger, radius 0.8 x diagonal, percentile 0.1
    "qwen": NuwaConstants(distance=None, radius_fraction=0.8, pillar_quantile=0.1, self_weight_one=False,
                          features=(7 / 32, 23 / 32)),
}


def family_variant(family: str | None) -> str:
    """The Nüwa variant of a registered family (`FamilyAdapter.nuwa_variant`); "llava" for None or an unknown
    name."""
    from visroute.families import families

    cls = families().get(family or "")
    return cls.nuwa_variant if cls is not None else "llava"


def _layer_at(fraction: float, depth: int) -> int:
    return min(depth - 1, max(0, int(math.floor(fraction * depth + 0.5))))


def _needs(adapter, *methods: str) -> None:
    missing = [m for m in methods if not type(adapter).provides(m)]
    if missing:
        raise ValueError(f"The {type(adapter).__name__} family adapter does not provide {', '.join(missing)}, "
                         "which this merge needs")


@register_merge
class NuwaMerge(TowerMerge):
    """Nüwa's aggregation ("region cohesion"), applied to the tokens a layer-0 stage keeps, per image:

        F = mean of the tower's hidden states over mid-to-late layers      (similarity features)
        W_ij = ReLU(cos(F_i, F_j)) * max(0, 1 - d_ij / r)                   (d: grid distance of tokens i, j)
        pillars: kept tokens whose tower attention score s_i >= quantile_q({s_k : k kept})
        pillar i:     x'_i = X_i
        collector i:  LLaVA  x'_i = X_i + sum_{j != i} W_ij X_j / (sum_k W_ik + 1e-8)   (self weight set to 1)
                      Qwen   x'_i = sum_j W_ij X_j / (sum_k W_ik + 1e-8)                  (convex)

    with j over all of the image's visual tokens, kept or dropped (dropped tokens reach the decoder only
    through the collectors). The released constants (`variant`, by default the model family's):

    * "llava" (`clip_encoder.py`): X = the tower features the projector reads (CLIP space, before the
      projector; the merged features then go through the projector), F = the mean of the outputs of tower
      layers 15..23 of 24 (`hidden_states[16:25]`, the last included), r = sqrt(280) grid units, q = 0.55,
      self weight 1 (so a collector's weights sum to 2 - 1/sum_k W_ik: not a convex combination). The paper's
      threshold, "26% of the maximum distance", is 280 / 1058 of the squared 24 x 24 diagonal (about 51% of
      the linear one); the code's sqrt(280) is what runs here;
    * "qwen" (`qwen2_5vl_nuwa.py`): X = the merger's output (the decoder input embeddings), F = the merger
      applied to the mean of ViT block outputs 7..23 of 32, r = 0.8 x the diagonal of the grid padded to even
      sides, q = 0.1, convex weights.

    Layer ranges scale with the tower's depth (`features_from` / `features_to` set them). s is the tower
    attention score of `vision_cls_attention` at `layer` (the pillar split is scale-free, so Qwen's
    `mean(heads).sum(queries)` and this sum over heads, mean over queries, split alike). Under reroute, tokens
    the stage leaves out carry their own unmerged embedding (`visroute.merge`)."""

    name = "nuwa"
    description = "Nüwa's aggregation: pillars raw, collectors take a similarity x distance weighted sum of their image"

    @dataclass(frozen=True)
    class Options:
        variant: str | None = option(None, "released constants: llava or qwen (None: the model family's)",
                                     choices=(None, "llava", "qwen"))
        distance: float | None = option(None, "squared radius of the distance penalty in grid units (LLaVA: 280)")
        radius_fraction: float | None = option(None, "radius as a fraction of the even-padded grid diagonal (Qwen: 0.8)")
        pillar_quantile: float | None = option(None, "kept tokens scoring at or above this quantile stay raw "
                                                     "(LLaVA 0.55, Qwen 0.1)")
        features_from: int | None = option(None, "first tower layer (0-based) averaged into the similarity features")
        features_to: int | None = option(None, "last tower layer (0-based, inclusive) averaged")
        layer: int | None = option(None, "tower layer of the attention score that splits pillars (None: the "
                                         "layer the projector reads)")

        def __post_init__(self):
            if self.distance is not None and self.radius_fraction is not None:
                raise ValueError("give distance or radius_fraction, not both")
            if self.distance is not None and self.distance <= 0:
                raise ValueError(f"distance must be positive, got {self.distance}")
            if self.radius_fraction is not None and self.radius_fraction <= 0:
                raise ValueError(f"radius_fraction must be positive, got {self.radius_fraction}")
            if self.pillar_quantile is not None and not 0.0 <= self.pillar_quantile <= 1.0:
                raise ValueError(f"pillar_quantile must lie in [0, 1], got {self.pillar_quantile}")

    def tower_hooks(self, adapter, capture: TowerCapture) -> None:
        _needs(adapter, "hook_vision_features")
        o = self.options
        c = VARIANTS[o.variant or adapter.nuwa_variant]
        if o.distance is not None or o.radius_fraction is not None:
            c = NuwaConstants(o.distance, o.radius_fraction, c.pillar_quantile, c.self_weight_one, c.features)
        if o.pillar_quantile is not None:
            c = NuwaConstants(c.distance, c.radius_fraction, o.pillar_quantile, c.self_weight_one, c.features)
        depth = len(adapter.vision_attention_modules())
        first = _layer_at(c.features[0], depth) if o.features_from is None else o.features_from % depth
        last = _layer_at(c.features[1], depth) if o.features_to is None else o.features_to % depth
        self.constants, self.feature_layers = c, (first, last)
        capture.add(adapter.hook_vision_scores(o.layer, capture.sink("scores")))
        capture.add(adapter.hook_vision_features(first, last, capture.sink("features")))

    def _radius(self, grid: TokenGrid) -> torch.Tensor:
        c = self.constants
        if c.distance is not None:
            return torch.full(grid.rows.shape, math.sqrt(c.distance), device=grid.rows.device)
        padded_r, padded_c = grid.rows + grid.rows % 2, grid.cols + grid.cols % 2
        diag = ((padded_r - 1).float() ** 2 + (padded_c - 1).float() ** 2).sqrt()
        return torch.where(diag > 0, diag * c.radius_fraction, torch.ones_like(diag))

    def merge(self, ctx: StageContext, selected: torch.Tensor) -> torch.Tensor:
        valid = ctx.layout.valid
        device = valid.device
        grid = token_grid(ctx, "The nuwa merge")
        scores = self.captured("scores", valid)
        feats = F.normalize(self.captured("features", valid), dim=-1)
        x, embeds = self.features(ctx)
        kept = selected.to(device) & valid
        tau = group_quantile(scores, grid.image, kept, self.constants.pillar_quantile)
        pillar = kept & (scores >= tau)
        radius = self._radius(grid)

        k_index, k_valid = compact_index(kept, dummy=0)  # (B, K): the kept tokens of each sample
        b, nv = valid.shape
        merged = torch.zeros(b, k_index.shape[1], x.shape[-1], device=device)
        rows = max(1, CHUNK_ELEMENTS // max(1, b * nv))
        columns = torch.arange(nv, device=device)
        for start in range(0, k_index.shape[1], rows):
            idx = k_index[:, start : start + rows]  # (B, r)

            def at(t: torch.Tensor) -> torch.Tensor:
                return t.gather(1, idx)[:, :, None]  # (B, r, 1)

            same = (at(grid.image) == grid.image[:, None, :]) & (at(grid.frame) == grid.frame[:, None, :])
            same &= valid[:, None, :]
            dist = ((at(grid.row) - grid.row[:, None, :]).float() ** 2
                    + (at(grid.col) - grid.col[:, None, :]).float() ** 2).sqrt()
            penalty = (1.0 - (dist / at(radius)).clamp(max=1.0)) * same
            sim = torch.einsum("brd,bnd->brn", gather_rows(feats, idx), feats)
            w = F.relu(sim) * penalty  # (B, r, Nv)
            is_self = idx[:, :, None] == columns[None, None, :]
            w = torch.where(at(pillar) & ~is_self, torch.zeros_like(w), w)  # a pillar keeps only itself
            w = w / (w.sum(-1, keepdim=True) + 1e-8)
            if self.constants.self_weight_one:
                w = torch.where(is_self, torch.ones_like(w), w)
            merged[:, start : start + rows] = torch.einsum("brn,bnd->brd", w, x)
        return self.emit(embeds, k_index, k_valid, merged)
