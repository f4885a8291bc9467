"""What one routed prefill did: the visual-token layout of each sample, the selection at every stage, and the
tokens that ran and were cached in every decoder layer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ImageSpan:
    """One image inside a sample's visual tokens: its tokens are `offset .. offset+length-1` (indices into that
    sample's visual tokens), laid out row-major over `frames` x `rows` x `cols` (after any patch merge).
    `rows`/`cols` are None when the tokens do not form a grid (e.g. a kept [CLS] token)."""

    offset: int
    length: int
    rows: int | None
    cols: int | None
    frames: int = 1


@dataclass
class VisualLayout:
    """Where the visual tokens of each sample sit in the padded batch sequence.

    positions: (B, Nv) sequence index of each sample's j-th visual token (padded with the dummy index L).
    valid:     (B, Nv) True for a real visual token.
    images:    per sample, the ImageSpans in order.
    pinned:    (B, Nv) visual tokens the family keeps active whatever a stage selects, or None.
    """

    positions: torch.Tensor
    valid: torch.Tensor
    images: list[list[ImageSpan]]
    pinned: torch.Tensor | None = None  # (B, Nv) visual tokens always active, never chosen among (or None)

    @property
    def counts(self) -> torch.Tensor:
        return self.valid.sum(1)


@dataclass
class StageRecord:
    """One stage of a prefill. `active` (B, Nv) marks the visual tokens that ran in this stage;
    `requested` the keep count each sample asked for, `candidates` how many tokens it could choose from;
    `scores` what the scorer returned (None when the decisions were replayed); `scorer_flops` the FLOPs the
    scoring took, when the router measures them; `score_layer` the layer the scores were taken at."""

    layer: int
    keep: int | float
    active: torch.Tensor
    requested: torch.Tensor
    candidates: torch.Tensor
    num_visual: torch.Tensor
    scores: torch.Tensor | None = None
    scorer_flops: int | None = None
    score_layer: int | None = None

    @property
    def selected(self) -> list[torch.Tensor]:
        """One LongTensor per sample: indices into that sample's visual tokens, ascending."""
        return [row.nonzero().flatten().cpu() for row in self.active]

    @property
    def clipped(self) -> list[bool]:
        """Per sample: the keep asked for more tokens than there were candidates, so all were kept."""
        return (self.requested > self.candidates).tolist()

    @property
    def kept(self) -> torch.Tensor:
        return self.active.sum(1)


@dataclass
class RoutingRecord:
    """What the last routed prefill did.

    stages:        the StageRecords in schedule order.
    active_tokens: (num_layers, B) tokens that ran in each layer (text + active visual; padding excluded).
    active_visual: (num_layers, B) visual tokens that ran in each layer.
    kv_tokens:     (num_layers, B) K/V entries cached per layer after prefill (read from the cache), or None
                   when no cache was kept.
    num_visual:    (B,) visual tokens per sample; `images` their layout.
    """

    action: str
    scorer: str
    num_layers: int
    num_visual: torch.Tensor
    images: list[list[ImageSpan]]
    seq_lengths: torch.Tensor
    stages: list[StageRecord] = field(default_factory=list)
    active_tokens: torch.Tensor | None = None
    active_visual: torch.Tensor | None = None
    kv_tokens: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.num_visual.shape[0])

    @property
    def avg_visual_tokens(self) -> torch.Tensor:
        """(B,) avg_T of each sample: mean over decoder layers of its visual tokens active in that layer."""
        return self.active_visual.float().mean(0)

    @property
    def avg_T(self) -> float:
        """avg_T averaged over the batch."""
        return float(self.avg_visual_tokens.mean())
