"""VisionZip (Yang et al., CVPR 2025, "Longer is Better but Not Necessary"): before the decoder, keep a few
*dominant* tokens, those the vision tower's [CLS] attends to most, plus a few *contextual* tokens into which every
other token is merged. The scorer `visionzip` chooses both kinds; the merge `visionzip` folds the rest into the
contextual ones. A stage uses both: `Stage(0, 64, scorer="visionzip", merge="visionzip")`."""

from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.nn.functional as F

from visroute.merge import image_ids, register_merge
from visroute.scoring import option, register
from visroute.scoring.base import StageContext
from visroute.scoring.nuwa import (
    TowerCapture,
    TowerMerge,
    _needs,
    above_the_rest,
    rank_within,
    split_per_image,
)
from visroute.scoring.vision import VisionCLSAttention
from visroute.tensors import CHUNK_ELEMENTS, compact_index, gather_rows

CONTEXTUAL_SHARE = 10 / 64  # VisionZip's LLaVA-1.5 settings: 54 + 10, 108 + 20, 162 + 30 tokens


def contextual_count(keep: torch.Tensor, share: float) -> torch.Tensor:
    """How many of an image's `keep` tokens are contextual: round(keep x share) (64 -> 10, 128 -> 20, 192 -> 30)."""
    return torch.floor(keep.double() * share + 0.5).long().clamp(min=0, max=None).minimum(keep)


def _count_in_image(image: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """(B, Nv): how many members the token's image holds."""
    n_img = max(1, int(image.max()) + 1) if image.numel() else 1
    counts = torch.zeros(image.shape[0], n_img, dtype=torch.long, device=image.device)
    counts.scatter_add_(1, image.clamp(min=0), (member & (image >= 0)).long())
    return counts.gather(1, image.clamp(min=0))


def _option_share():
    return option(CONTEXTUAL_SHARE, "share of each image's keep that is contextual (merged) tokens; "
                                    "the scorer and the merge of a stage take the same value")


def _check_share(value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"contextual must lie in [0, 1), got {value}")


@register
class VisionZipScorer(VisionCLSAttention):
    """VisionZip's selection, per image: its share of the stage's keep k (a sample's keep split over its images
    in proportion to their candidates) is d = k - c dominant and c = round(k x `contextual`) contextual tokens.

    * dominant: the d candidates with the highest vision-tower [CLS] attention, summed over heads, at the layer
      the projector reads (VisionZip's `attentions[-2]`; Qwen's ViT: the attention a merged token receives, as
      `vision_cls_attention`);
    * contextual: from the remaining candidates in token order, every `step`-th, step = max(1, R // c) with R
      of them, the first c (VisionZip's uniformly spaced targets).

    Scores rank the dominant tokens first, then the contextual ones, so the engine's top-k keeps exactly them.
    VisionZip counts the [CLS] token among its dominant tokens (54 = [CLS] + 53 patches at its "64"); the visual
    tokens here are the patches, so all d are patches."""

    name = "visionzip"
    description = "VisionZip: dominant tokens by vision-tower [CLS] attention + uniformly spaced contextual tokens"
    before_decoder = True

    @dataclass(frozen=True)
    class Options(VisionCLSAttention.Options):
        contextual: float = _option_share()

        def __post_init__(self):
            _check_share(self.contextual)

    def score(self, ctx: StageContext) -> torch.Tensor:
        raw = super().score(ctx)
        valid = ctx.layout.valid.to(raw.device)
        image = image_ids(ctx).to(raw.device)
        candidates = ctx.candidates.to(raw.device) & valid
        keep = split_per_image(image, candidates, ctx.budget())
        c = contextual_count(keep, self.options.contextual)
        dominant = candidates & (rank_within(image, raw, candidates) < keep - c)
        remaining = candidates & ~dominant
        index = torch.arange(raw.shape[1], device=raw.device, dtype=torch.float32).expand_as(raw)
        order = rank_within(image, -index, remaining)  # position among the remaining, in token order
        step = (_count_in_image(image, remaining) // c.clamp(min=1)).clamp(min=1)
        target = remaining & (c > 0) & (order % step == 0) & (order // step < c)
        return above_the_rest(raw, valid, [dominant, target])


@register_merge
class VisionZipMerge(TowerMerge):
    """VisionZip's contextual merge, per image: of the kept tokens, the top k - c by the tower's [CLS]
    attention are dominant and stay as they are, the other c are contextual targets (with the `visionzip`
    scorer, exactly its two kinds). Every token the stage drops joins the target whose key is most similar
    (cosine of the tower layer's keys averaged over heads, VisionZip's `metric`; ties to the first target), and
    a target enters as

        x'_t = X_t + mean_{d joins t} X_d     (X_t alone when none joins)

    in the tower's feature space before the projector where the family has one to hook (LLaVA: then projected),
    else on the decoder input embeddings (Qwen, whose merger is its projector). VisionZip places its tokens
    one after another before the text; here each keeps the position of the token it stands in."""

    name = "visionzip"
    description = "VisionZip: dropped tokens join the most similar contextual token (key cosine): target + mean"

    @dataclass(frozen=True)
    class Options:
        contextual: float = _option_share()
        layer: int | None = option(None, "tower layer of the [CLS] attention and the keys (None: the layer the "
                                         "projector reads)")

        def __post_init__(self):
            _check_share(self.contextual)

    def tower_hooks(self, adapter, capture: TowerCapture) -> None:
        _needs(adapter, "hook_vision_keys")
        capture.add(adapter.hook_vision_scores(self.options.layer, capture.sink("scores")))
        capture.add(adapter.hook_vision_keys(self.options.layer, capture.sink("keys")))

    def merge(self, ctx: StageContext, selected: torch.Tensor) -> torch.Tensor:
        valid = ctx.layout.valid
        device = valid.device
        scores = self.captured("scores", valid)
        metric = F.normalize(self.captured("keys", valid), dim=-1)
        x, embeds = self.features(ctx)
        image = image_ids(ctx)
        kept = selected.to(device) & valid
        keep = _count_in_image(image, kept)
        dominant = kept & (rank_within(image, scores, kept) < keep - contextual_count(keep, self.options.contextual))
        target = kept & ~dominant
        dropped = valid & ~kept

        b, nv = valid.shape
        joins = torch.full((b, nv), -1, dtype=torch.long, device=device)
        rows = max(1, CHUNK_ELEMENTS // max(1, b * nv))
        for start in range(0, nv, rows):
            sim = torch.einsum("brd,bnd->brn", metric[:, start : start + rows], metric)
            same = image[:, start : start + rows, None] == image[:, None, :]
            sim = sim.masked_fill(~(same & target[:, None, :]), float("-inf"))
            best, arg = sim.max(-1)  # the first of equal maxima: the lowest-index target
            joins[:, start : start + rows] = torch.where(dropped[:, start : start + rows] & torch.isfinite(best), arg, -1)
        joined = joins >= 0
        sums = torch.zeros_like(x).scatter_add_(1, joins.clamp(min=0)[..., None].expand_as(x),
                                                torch.where(joined[..., None], x, torch.zeros_like(x)))
        counts = torch.zeros(b, nv, device=device).scatter_add_(1, joins.clamp(min=0), joined.float())
        merged = torch.where((target & (counts > 0))[..., None], x + sums / counts.clamp(min=1)[..., None], x)
        k_index, k_valid = compact_index(kept, dummy=0)  # project the kept tokens only
        return self.emit(embeds, k_index, k_valid, gather_rows(merged, k_index))
