"""Re-entry policies: how a reroute stage chooses its active set when some candidates ran in the previous segment
(incumbents) and others were bypassed there (challengers).

Rerouting makes every decision a ranking over all candidates by one layer's signal, so it loses what a pruning
cascade has (each stage choosing among the survivors of the last), and small late budgets can fill with tokens
bypassed since early layers. A policy decides how much of that filtering to keep. Every policy keeps exactly
`min(keep, candidates)` tokens, so the schedule's per-layer counts (avg_T, FLOPs, K/V) are those of the
reference behaviour; only which tokens run changes.

Scores of different layers are not on one scale (attention shares shrink as more tokens compete), so the policies
that compare or mix them use percentile ranks among the stage's candidates: 1 for the best, 0 for the worst.

    reference    the top `keep` candidates by this decision's scores (elmma/mllm-reroute's `compact_route`)
    hysteresis   a challenger ranks above an incumbent only if its percentile beats the incumbent's by `margin`
    cumulative   rank by a running mix of percentiles: r_t = alpha * p_t + (1 - alpha) * r_(t-1)
    quota        at most floor(share * keep) of a decision's tokens may be challengers (the rest are filled by
                 incumbents; challengers beyond the quota run only when incumbents run out)

    from visroute.reentry import ReentryPolicy, register_reentry
    @register_reentry
    class MyPolicy(ReentryPolicy):
        name = "mine"
        description = "..."
        def select(self, scores, candidates, previous, keep): ...   # (B, Nv) bool, exactly min(keep, #cand)

Third-party packages register policies through the entry-point group `visroute.reentry`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from visroute.options import HasOptions, option
from visroute.registry import Registry

ENTRY_POINT_GROUP = "visroute.reentry"


def _sanitized(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    big = torch.finfo(torch.float32).max
    s = scores if scores.dtype == torch.float64 else scores.float()
    s = torch.nan_to_num(s, nan=-big, posinf=big, neginf=-big)
    return torch.where(candidates, s, torch.full_like(s, float("-inf")))


def select_top(scores: torch.Tensor, candidates: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, Nv) bool: per sample the `min(keep, #candidates)` candidates with the highest scores (ties go to the
    lower index)."""
    s = _sanitized(scores, candidates)
    k = torch.minimum(keep.to(s.device), candidates.sum(1))
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    take = torch.arange(s.shape[1], device=s.device)[None, :] < k[:, None]
    return torch.zeros_like(candidates).scatter_(1, order, take)


def percentiles(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(B, Nv) float64: each candidate's percentile rank among its sample's candidates, 1 for the highest score and
    0 for the lowest (ties ranked by index, as `select_top` does; a lone candidate gets 1); 0 off the candidates."""
    s = _sanitized(scores, candidates)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(s.shape[1], device=s.device).expand_as(order))
    n = candidates.sum(1, keepdim=True)
    p = 1.0 - rank.double() / (n - 1).clamp(min=1).double()  # float64: ties stay ties when mixed (cumulative)
    return torch.where(candidates, p, torch.zeros_like(p))


class ReentryPolicy(HasOptions):
    """Chooses a reroute stage's active set. See the module docstring."""

    kind = "re-entry policy"
    description: ClassVar[str] = ""

    def __init__(self, **options):
        self.options = self.build_options(options)

    def begin_prefill(self) -> None:
        """Called at the start of every routed prefill (policies with memory reset it here)."""

    def select(self, scores: torch.Tensor, candidates: torch.Tensor, previous: torch.Tensor,
               keep: torch.Tensor) -> torch.Tensor:
        """(B, Nv) bool, exactly `min(keep, #candidates)` per sample. scores (B, Nv) this decision's scores;
        candidates (B, Nv) the tokens it may choose; previous (B, Nv) the tokens active in the segment before it;
        keep (B,) the count to choose."""
        raise NotImplementedError


REENTRY = Registry("re-entry policy", ReentryPolicy, ENTRY_POINT_GROUP)


def register_reentry(cls: type[ReentryPolicy]) -> type[ReentryPolicy]:
    """Class decorator: register a re-entry policy under its `name`."""
    return REENTRY.register(cls)


def get_reentry_class(name: str) -> type[ReentryPolicy]:
    return REENTRY.get(name)


def build_reentry(name: str, options: dict | None = None) -> ReentryPolicy:
    return get_reentry_class(name)(**(options or {}))


def reentry_policies() -> dict[str, type[ReentryPolicy]]:
    """Every registered policy by name."""
    return REENTRY.available()


@register_reentry
class Reference(ReentryPolicy):
    name = "reference"
    description = ("the top keep candidates by this decision's scores alone, bypassed or not (the Reroute "
                   "reference code's behaviour)")

    def select(self, scores, candidates, previous, keep):
        return select_top(scores, candidates, keep)


@register_reentry
class Hysteresis(ReentryPolicy):
    name = "hysteresis"
    description = ("a bypassed token displaces a token that ran only if its percentile rank beats that token's by "
                   "`margin`: the top keep of p - margin * [bypassed]")

    @dataclass(frozen=True)
    class Options:
        margin: float = option(0.1, "percentile points a bypassed token must gain over the token it displaces")

        def __post_init__(self):
            if not 0 <= self.margin <= 1:
                raise ValueError(f"margin must lie in [0, 1], got {self.margin}")

    def select(self, scores, candidates, previous, keep):
        challenger = candidates & ~previous
        adjusted = percentiles(scores, candidates) - self.options.margin * challenger.float()
        return select_top(adjusted, candidates, keep)


@register_reentry
class Cumulative(ReentryPolicy):
    name = "cumulative"
    description = ("rank by a running mix of the percentile ranks of every reroute decision so far: "
                   "r_t = alpha * p_t + (1 - alpha) * r_(t-1), r_1 = p_1")

    @dataclass(frozen=True)
    class Options:
        alpha: float = option(0.5, "weight of the current decision's percentile rank")

        def __post_init__(self):
            if not 0 < self.alpha <= 1:
                raise ValueError(f"alpha must lie in (0, 1], got {self.alpha}")

    def begin_prefill(self) -> None:
        self._running: torch.Tensor | None = None

    def select(self, scores, candidates, previous, keep):
        p = percentiles(scores, candidates)
        running = getattr(self, "_running", None)
        if running is None or running.shape != p.shape:
            mixed = p
        else:
            a = self.options.alpha
            mixed = torch.where(candidates, a * p + (1 - a) * running.to(p.device), running.to(p.device))
        self._running = mixed
        return select_top(mixed, candidates, keep)


@register_reentry
class Quota(ReentryPolicy):
    name = "quota"
    description = ("at most floor(share * keep) of a decision's tokens are bypassed ones (best first); "
                   "tokens that ran fill the rest, and bypassed ones beyond the quota only when those run out")

    @dataclass(frozen=True)
    class Options:
        share: float = option(0.25, "the largest share of each decision's keep that bypassed tokens may take")

        def __post_init__(self):
            if not 0 <= self.share <= 1:
                raise ValueError(f"share must lie in [0, 1], got {self.share}")

    def select(self, scores, candidates, previous, keep):
        s = _sanitized(scores, candidates)
        order = torch.sort(s, dim=1, descending=True, stable=True).indices
        challenger = torch.gather(candidates & ~previous, 1, order)  # in score order
        outside = ~torch.gather(candidates, 1, order)
        quota = torch.tensor([math.floor(self.options.share * int(k)) for k in keep.tolist()], device=s.device)
        over = challenger & (challenger.long().cumsum(1) > quota[:, None])
        # in score order: the candidates within the quota, then the challengers over it, then the non-candidates
        n = s.shape[1]
        priority = (over.long() + 2 * outside.long()) * n + torch.arange(n, device=s.device)[None, :]
        ranked = torch.gather(order, 1, torch.sort(priority, dim=1, stable=True).indices)
        k = torch.minimum(keep.to(s.device), candidates.sum(1))
        take = torch.arange(s.shape[1], device=s.device)[None, :] < k[:, None]
        return torch.zeros_like(candidates).scatter_(1, ranked, take)


__all__ = ["ENTRY_POINT_GROUP", "REENTRY", "ReentryPolicy", "build_reentry", "get_reentry_class", "percentiles",
           "reentry_policies", "register_reentry", "select_top"]
