"""Merges for stages before the decoder: a stage at layer 0 may, instead of simply dropping the tokens it does
not keep, fold them into the ones it keeps (Nüwa's aggregation, VisionZip's contextual tokens, token merging).

A merge receives the stage's context and its selection, and returns the decoder input embeddings of the kept
tokens. Under `prune` the dropped tokens are then gone; under `reroute` the kept tokens enter the decoder with
their merged features while a token left out carries its own, unmerged input embedding and re-enters with it
(merging is a property of the tokens that run, never of what a bypassed token carries).

    from visroute.merge import Merge, register_merge
    @register_merge
    class MyMerge(Merge):
        name = "my_merge"
        description = "..."
        def merge(self, ctx, selected):   # selected (B, Nv) bool -> (B, Nv, D) embeddings (kept rows used)
            ...

Third-party packages register merges through the entry-point group `visroute.merges`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from visroute.options import HasOptions
from visroute.registry import Registry
from visroute.tensors import CHUNK_ELEMENTS, gather_rows

if TYPE_CHECKING:
    from visroute.families.base import FamilyAdapter
    from visroute.scoring.base import StageContext

ENTRY_POINT_GROUP = "visroute.merges"


class Merge(HasOptions):
    """Folds the tokens a layer-0 stage drops into the ones it keeps. See the module docstring."""

    kind = "merge"
    description: ClassVar[str] = ""

    def __init__(self, **options: Any):
        self.options = self.build_options(options)

    def attach(self, adapter: "FamilyAdapter") -> None:
        """Called once by `apply_routing` (e.g. to hook the vision tower for the features it merges)."""

    def detach(self) -> None:
        """Undo `attach`."""

    def begin_prefill(self) -> None:
        """Called at the start of every routed prefill."""

    def merge(self, ctx: "StageContext", selected: torch.Tensor) -> torch.Tensor:
        """(B, Nv, D) decoder input embeddings for each sample's visual tokens; only the rows of `selected`
        (B, Nv) bool are used."""
        raise NotImplementedError


REGISTRY: Registry = Registry("merge", Merge, ENTRY_POINT_GROUP)


def register_merge(cls: type[Merge]) -> type[Merge]:
    """Register a merge class (a decorator). A name another merge already holds is an error."""
    REGISTRY.register(cls)
    cls.option_specs()
    return cls


def get_merge_class(name: str) -> type[Merge]:
    return REGISTRY.get(name)


def available_merges() -> dict[str, type[Merge]]:
    return REGISTRY.available()


def image_ids(ctx: "StageContext") -> torch.Tensor:
    """(B, Nv) long: which image of its sample each visual token belongs to (-1 for padding)."""
    out = torch.full(ctx.layout.positions.shape, -1, dtype=torch.long)
    for b, spans in enumerate(ctx.layout.images):
        for i, span in enumerate(spans):
            out[b, span.offset : span.offset + span.length] = i
    return out.to(ctx.layout.positions.device)


@register_merge
class SimilarityAverage(Merge):
    """Token merging by nearest kept token: every visual token the stage drops joins the kept token of the same
    image whose input embedding is most similar to its own (cosine), and each kept token enters the decoder with
    the mean of its own embedding and the embeddings that joined it:

        x'_k = (x_k + sum_{d: t(d) = k} x_d) / (1 + |{d: t(d) = k}|),   t(d) = argmax_{k kept} cos(x_d, x_k)

    the contextual merge of VisionZip (which merges into a few dedicated tokens) and ToMe-style averaging,
    done in the decoder's input space. An image none of whose tokens is kept merges nothing."""

    name = "similarity_average"
    description = "dropped tokens join the most similar kept token of their image; kept tokens enter as the mean"

    def merge(self, ctx: "StageContext", selected: torch.Tensor) -> torch.Tensor:
        positions, valid = ctx.layout.positions, ctx.layout.valid
        x = gather_rows(ctx.inputs_embeds, positions)  # (B, Nv, D)
        b, nv, dim = x.shape
        unit = F.normalize(x.float(), dim=-1)
        image = image_ids(ctx)
        kept, dropped = selected & valid, valid & ~selected
        target = torch.full((b, nv), -1, dtype=torch.long, device=x.device)
        rows = max(1, CHUNK_ELEMENTS // max(1, b * nv))
        for start in range(0, nv, rows):
            sim = torch.einsum("brd,bkd->brk", unit[:, start : start + rows], unit)  # (B, rows, Nv)
            same = image[:, start : start + rows, None] == image[:, None, :]
            sim = sim.masked_fill(~(same & kept[:, None, :]), float("-inf"))
            best, arg = sim.max(-1)
            joins = dropped[:, start : start + rows] & torch.isfinite(best)
            target[:, start : start + rows] = torch.where(joins, arg, -1)
        joined = target >= 0
        sums = torch.where(kept[..., None], x.float(), 0.0)
        sums.scatter_add_(1, target.clamp(min=0)[..., None].expand(-1, -1, dim), torch.where(joined[..., None], x.float(), 0.0))
        counts = kept.float() + torch.zeros(b, nv, device=x.device).scatter_add_(1, target.clamp(min=0), joined.float())
        return (sums / counts.clamp(min=1)[..., None]).to(x.dtype)


@register_merge
class PoolAverage(Merge):
    """Average pooling of each image's token grid (the pooling / downsample control): the kept tokens of an
    image must be the centres of the `pool_blocks` partition of its grid into as many blocks as it keeps (what
    the `pool` scorer selects), and each enters the decoder with the mean input embedding of its block:

        x'_k = mean_{t in block(k)} x_t

    so a layer-0 prune stage `{layer: 0, keep: k, merge: pool_average}` with scorer `pool` feeds the decoder
    the visual grid average-pooled to k tokens (LLaVA-1.5: 24 x 24 -> 8 x 8 at k = 64; Qwen2/2.5-VL: the
    merged grid; the testbed: 12 x 12).

    Departures from downsampling the image, named: pooling happens in the decoder's input space (after the
    projector), not on pixels or vision features; each pooled token keeps the position id of its block's
    centre token (the engine keeps active tokens' original positions), so the decoder sees the pooled grid at
    the original grid's positions (gaps between them) rather than a compact k-token image, which a downsampled
    image would give (and, for Qwen's M-RoPE, a smaller (h, w) grid of positions)."""

    name = "pool_average"
    description = "each kept token enters as the mean of its pooling block (the pooling control; scorer pool)"

    def merge(self, ctx: "StageContext", selected: torch.Tensor) -> torch.Tensor:
        from visroute.scoring.controls import image_grid, pool_blocks

        x = gather_rows(ctx.inputs_embeds, ctx.layout.positions)  # (B, Nv, D)
        out = x.clone()
        sel = selected.cpu()
        for b, spans in enumerate(ctx.layout.images):
            for span in spans:
                kept = sel[b, span.offset : span.offset + span.length].nonzero().flatten()
                if kept.numel() == 0:
                    continue
                block, centres = pool_blocks(*image_grid(span), kept.numel())
                if not torch.equal(kept, centres.sort().values):
                    raise ValueError("The pool_average merge needs the kept tokens to be the centres of its pooling "
                                     "blocks (use scorer pool, as the first stage at layer 0)")
                tokens = x[b, span.offset : span.offset + span.length].float()
                sums = torch.zeros(centres.numel(), tokens.shape[-1], device=tokens.device)
                sums.index_add_(0, block.to(tokens.device), tokens)
                sizes = torch.bincount(block, minlength=centres.numel()).to(tokens.device)
                out[b, span.offset + centres.to(out.device)] = (sums / sizes[:, None]).to(out.dtype)
        return out
