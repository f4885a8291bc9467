"""The scorer interface and the context a scorer sees at a stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from visroute.record import VisualLayout

if TYPE_CHECKING:
    from visroute.families.base import FamilyAdapter


@dataclass
class StageContext:
    """Everything a scorer may use at one stage of one prefill. Sequence tensors have length L+1: the last
    slot is a dummy that padded index tensors point to.

    hidden:      (B, L+1, D) hidden states entering the stage's layer; for tokens that did not run in the
                 previous stage, the state they carry (reroute) or last had (prune).
    inputs_embeds: (B, L+1, D) the decoder's input embeddings (after the projector).
    valid:       (B, L+1) real (non-padding) tokens.
    text:        (B, L+1) text tokens (valid and not visual).
    layout:      where each sample's visual tokens sit and which images they form.
    candidates:  (B, Nv) visual tokens the stage may select (prune: the ones active so far; reroute: all).
    key_mask:    (B, L+1) tokens that count as present at this layer for attention scores: text + candidates.
    cos, sin:    (B, L+1, head_dim) rotary embeddings of every position.
    last_index:  (B,) sequence index of each sample's last prompt token.
    layer:       the decoder layer the stage starts at (for its q/k projections), and `layer_index`.
    input_ids:   (B, L) or None.
    extras:      per-call inputs given through `Router.call_options` (e.g. an oracle's relevance).
    requested:   (B,) the keep count the stage asks for per sample (see `budget`).
    """

    stage_index: int
    layer_index: int
    action: str
    layer: nn.Module
    hidden: torch.Tensor
    inputs_embeds: torch.Tensor
    valid: torch.Tensor
    text: torch.Tensor
    layout: VisualLayout
    candidates: torch.Tensor
    key_mask: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    last_index: torch.Tensor
    input_ids: torch.Tensor | None
    adapter: "FamilyAdapter"
    requested: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def instruction_mask(self) -> torch.Tensor:
        """(B, L+1) prompt tokens after each sample's last visual token (DESIGN.md's instruction tokens)."""
        seq = torch.arange(self.valid.shape[1], device=self.valid.device)
        last_visual = torch.where(self.layout.valid, self.layout.positions, -1).max(1).values
        return self.valid & (seq[None, :] > last_visual[:, None]) & (seq[None, :] <= self.last_index[:, None])

    @property
    def query_text_mask(self) -> torch.Tensor:
        """(B, L+1) the instruction tokens; for a sample without any (its prompt ends with an image), its last
        prompt token, so that text-guided scorers always have a query."""
        instruction = self.instruction_mask
        seq = torch.arange(self.valid.shape[1], device=self.valid.device)
        last = seq[None, :] == self.last_index[:, None]
        return instruction | (last & ~instruction.any(1, keepdim=True))

    def budget(self) -> torch.Tensor:
        """(B,) how many visual tokens the stage will keep per sample: its keep count, at most the candidates.
        Selection procedures (DART, DivPrune, the uniform lattice) need it; rankings do not."""
        return torch.minimum(self.requested.to(self.candidates.device), self.candidates.sum(1))

    def gather_visual(self, per_token: torch.Tensor) -> torch.Tensor:
        """Pick the visual positions out of a (B, L+1) per-token tensor -> (B, Nv)."""
        return per_token.gather(1, self.layout.positions)


class Scorer:
    """Ranks the candidate visual tokens at a stage: `score` returns (B, Nv) floats, higher = keep.
    Scores of non-candidates and padding are ignored.

    Class attributes a scorer declares:
      name         its registry name (the `scorer=` of RoutingConfig)
      description  one line for `visroute scorers`
      options      option name -> (default, one-line doc); unknown options are an error
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    options: ClassVar[dict[str, tuple[Any, str]]] = {}

    def __init__(self, **options: Any):
        unknown = set(options) - set(self.options)
        if unknown:
            known = ", ".join(self.options) or "none"
            raise ValueError(f"Unknown option(s) {sorted(unknown)} for scorer {self.name!r}; it takes: {known}")
        self.opts = {k: options.get(k, default) for k, (default, _doc) in self.options.items()}

    def attach(self, adapter: "FamilyAdapter") -> None:
        """Called once by `apply_routing` (e.g. to install a hook on the vision tower)."""

    def detach(self) -> None:
        """Undo `attach`."""

    def score(self, ctx: StageContext) -> torch.Tensor:
        raise NotImplementedError
