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
    scoring took, when the router measures them; `score_layer` the layer the scores were taken at; `action`
    the stage's action ("prune" or "reroute")."""

    layer: int
    keep: int | float
    active: torch.Tensor
    requested: torch.Tensor
    candidates: torch.Tensor
    num_visual: torch.Tensor
    scores: torch.Tensor | None = None
    scorer_flops: int | None = None
    score_layer: int | None = None
    action: str | None = None

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
class Decision:
    """What one stage changed, per sample (B,): `evicted` tokens active in the segment before it and inactive
    after it; `readmitted` tokens inactive before it and active after it (only a reroute stage re-admits);
    `ages` per sample the age of each re-admitted token, in layers it skipped since it last ran (a token never run
    since the first stage counts from that stage's layer); with relevance given, `relevant_evicted` and
    `relevant_readmitted` count the relevant tokens among them (else None)."""

    layer: int
    action: str | None
    evicted: torch.Tensor
    readmitted: torch.Tensor
    ages: list[list[int]]
    relevant_evicted: torch.Tensor | None = None
    relevant_readmitted: torch.Tensor | None = None

    @property
    def mean_age(self) -> float:
        """Mean age over every re-admitted token of the batch (nan when none)."""
        ages = [a for row in self.ages for a in row]
        return float(sum(ages) / len(ages)) if ages else float("nan")


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

    def decisions(self, relevance: list[torch.Tensor | None] | None = None) -> list[Decision]:
        """One `Decision` per stage: tokens evicted and re-admitted, the age of re-entrants, and (where
        `relevance` gives per sample a (Nv,) mask or weights, > 0 meaning relevant) the relevant ones among them.
        Computed from the stages' `active` sets alone."""
        if not self.stages:
            return []
        nv = self.stages[0].active.shape[1]
        before = torch.arange(nv)[None, :] < self.num_visual[:, None]  # every token runs before the first stage
        # the layer each token last ran up to (exclusive), per sample: the first stage's layer for all at first
        last_ran = torch.full(before.shape, self.stages[0].layer, dtype=torch.long)
        relevant = None
        if relevance is not None:
            relevant = torch.zeros_like(before)
            for b, r in enumerate(relevance):
                if r is not None:
                    r = torch.as_tensor(r).flatten().cpu()
                    relevant[b, :r.shape[0]] = r > 0
        out = []
        for i, st in enumerate(self.stages):
            cur = st.active.cpu().bool()
            evicted, readmitted = before & ~cur, cur & ~before
            ages = [(st.layer - last_ran[b][readmitted[b]]).tolist() for b in range(cur.shape[0])]
            out.append(Decision(
                layer=st.layer, action=st.action, evicted=evicted.sum(1), readmitted=readmitted.sum(1), ages=ages,
                relevant_evicted=None if relevant is None else (evicted & relevant).sum(1),
                relevant_readmitted=None if relevant is None else (readmitted & relevant).sum(1)))
            end = self.stages[i + 1].layer if i + 1 < len(self.stages) else self.num_layers
            last_ran = torch.where(cur, torch.full_like(last_ran, end), last_ran)
            before = cur
        return out
