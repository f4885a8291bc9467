"""The scorer interface: the context a scorer sees at a stage, typed scorer options, and the `Scorer` base.

A scorer declares, as class attributes:
  name            its registry name (the `scorer=` of RoutingConfig)
  description     one line for `visroute scorers`
  Options         a dataclass of its options (`option(default, help, choices=...)` fields); checked when the
                  scorer is built: an unknown option, a wrong type or a value outside `choices` is an error that
                  names the option
  call_inputs     per-call inputs it needs through `router.call_options(...)` (the oracle: "relevance")
  before_decoder  it needs nothing computed by a decoder layer, so a stage at layer 0 drops tokens before the
                  decoder runs (vision-tower, embedding, redundancy and control signals)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from visroute.options import HasOptions, NoOptions, OptionSpec, option  # noqa: F401 (re-exported)
from visroute.record import VisualLayout

if TYPE_CHECKING:
    from visroute.families.base import FamilyAdapter


@dataclass
class StageContext:
    """Everything a scorer may use at one stage of one prefill. Sequence tensors have length L+1: the last slot
    (`dummy`, index L) is a dummy that padded index tensors point to, so gathers and scatters need no masks;
    the helpers below keep it clear.

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
    def dummy(self) -> int:
        """Index of the dummy slot (L)."""
        return self.valid.shape[1] - 1

    def sequence_mask(self, per_visual: torch.Tensor) -> torch.Tensor:
        """(B, Nv) bool over each sample's visual tokens -> (B, L+1) bool at their sequence positions (padding
        entries land in the dummy slot, which is cleared)."""
        out = torch.zeros(self.valid.shape, dtype=torch.bool, device=per_visual.device)
        out.scatter_(1, self.layout.positions.to(per_visual.device), per_visual)
        out[:, self.dummy] = False
        return out

    def position_mask(self, index: torch.Tensor) -> torch.Tensor:
        """(B,) or (B, M) sequence indices -> (B, L+1) bool, True at them."""
        index = index if index.dim() == 2 else index[:, None]
        return torch.zeros_like(self.valid).scatter_(1, index.to(self.valid.device), True)

    def to_visual(self, per_key: torch.Tensor, key_index: torch.Tensor) -> torch.Tensor:
        """(B, K) values at the sequence positions `key_index` (padded entries pointing at the dummy slot) ->
        (B, Nv) values at each sample's visual tokens (0 where a visual token is not among the keys)."""
        full = torch.zeros(self.valid.shape, dtype=per_key.dtype, device=per_key.device)
        full.scatter_(1, key_index.to(per_key.device), per_key)
        full[:, self.dummy] = 0
        return full.gather(1, self.layout.positions.to(per_key.device))

    @property
    def instruction_mask(self) -> torch.Tensor:
        """(B, L+1) prompt tokens after each sample's last visual token (the design notes' instruction tokens)."""
        seq = torch.arange(self.valid.shape[1], device=self.valid.device)
        last_visual = torch.where(self.layout.valid, self.layout.positions, -1).max(1).values
        return self.valid & (seq[None, :] > last_visual[:, None]) & (seq[None, :] <= self.last_index[:, None])

    @property
    def query_text_mask(self) -> torch.Tensor:
        """(B, L+1) the instruction tokens; for a sample without any (its prompt ends with an image), its last
        prompt token, so that text-guided scorers always have a query."""
        instruction = self.instruction_mask
        last = self.position_mask(self.last_index)
        return instruction | (last & ~instruction.any(1, keepdim=True))

    def budget(self) -> torch.Tensor:
        """(B,) how many visual tokens the stage will keep per sample: its keep count, at most the candidates.
        Selection procedures (DART, DivPrune, the uniform lattice) need it; rankings do not."""
        return torch.minimum(self.requested.to(self.candidates.device), self.candidates.sum(1))


class Scorer(HasOptions):
    """Ranks the candidate visual tokens at a stage: `score` returns (B, Nv) floats, higher = keep.
    Scores of non-candidates and padding are ignored. See the module docstring for what a scorer declares."""

    kind = "scorer"
    description: ClassVar[str] = ""
    call_inputs: ClassVar[tuple[str, ...]] = ()
    before_decoder: ClassVar[bool] = False

    def __init__(self, **options: Any):
        self.options = self.build_options(options)

    def begin_prefill(self) -> None:
        """Called at the start of every routed prefill, before its first stage (e.g. to take the vision
        tower's scores of this call)."""

    def attach(self, adapter: "FamilyAdapter") -> None:
        """Called once by `apply_routing` (e.g. to install a hook on the vision tower)."""

    def detach(self) -> None:
        """Undo `attach`."""

    def score(self, ctx: StageContext) -> torch.Tensor:
        raise NotImplementedError
