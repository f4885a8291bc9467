"""Small batched index helpers shared by the engine and the scorers."""

from __future__ import annotations

import torch


def compact_index(mask: torch.Tensor, dummy: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For a (B, N) bool mask, the indices of its True entries per row, in order, right-padded with `dummy`
    (default N): returns (index (B, M), valid (B, M)) with M the largest row count."""
    batch, n = mask.shape
    counts = mask.sum(1)
    m = int(counts.max()) if batch else 0
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :m]
    valid = torch.arange(m, device=mask.device)[None, :] < counts[:, None]
    index = torch.where(valid, order, torch.full_like(order, n if dummy is None else dummy))
    return index, valid


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, N, ...) gathered along dim 1 with index (B, M) -> (B, M, ...)."""
    idx = index.to(x.device).view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return x.gather(1, idx)


def scatter_rows_(x: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """In place: x[b, index[b, m]] = rows[b, m]. Padded entries should point at a dummy row of x."""
    idx = index.to(x.device).view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return x.scatter_(1, idx, rows.to(device=x.device, dtype=x.dtype))


# Scoring computes attention rows, similarity rows and vision-tower rows in chunks of query rows, so that one
# chunk's fp32 intermediate stays near this many elements (2 MiB) and scoring memory stays linear in the
# sequence length.
CHUNK_ELEMENTS = 1 << 19

FLOOR_EPSILON = 1e-9  # a fraction times a count that should be an integer may land just below it in floats


def floor_keep(fraction: float, counts: torch.Tensor) -> torch.Tensor:
    """floor(fraction * counts) per entry (long), robust to the float error of a product meant to be whole."""
    return torch.floor(fraction * counts.double() + FLOOR_EPSILON).long()
