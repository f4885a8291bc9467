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
