"""Control scorers: they ignore what the model computes, so a real signal has to beat them."""

from __future__ import annotations

import torch

from visroute.scoring import register
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
    options = {"seed": (0, "random seed")}

    def score(self, ctx: StageContext) -> torch.Tensor:
        nv = ctx.layout.positions.shape[1]
        j = torch.arange(nv, device=ctx.valid.device)[None, :]
        base = _mix(torch.tensor(int(self.opts["seed"]) * 7919 + ctx.stage_index, device=ctx.valid.device) % _P)
        keys = _mix((sample_keys(ctx) + base) % _P)
        return _mix((keys[:, None] * 31 + j) % _P).float() / _P
