"""Block-wise Gram matrices and combination over a column range [start, start + n) of the [T, P] buffer.

A rank holding only a shard of the columns gets partial Gram matrices; the global one is their sum
over ranks (G = sum over shards of g_shard g_shard^T), so only [B, T, T] tensors need to cross ranks.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .layout import Layout
from .projection import gram


def _segments(layout: Layout, start: int, n: int) -> Iterator[tuple[int, int, int, int]]:
    """(factor index, block, lo, hi): the part [lo, hi) of each factor inside columns [start, start + n), shard-local."""
    end = start + n
    blocks = layout.block_of.tolist()
    for i, f in enumerate(layout.factors):
        lo, hi = max(f.offset, start), min(f.offset + f.numel, end)
        if lo < hi:
            yield i, blocks[i], lo - start, hi - start


def block_grams(cols: torch.Tensor, start: int, layout: Layout) -> torch.Tensor:
    """[T, n] columns starting at global column ``start`` -> [B, T, T] fp32 (partial) block Gram matrices."""
    T = cols.shape[0]
    grams = torch.zeros(layout.num_blocks, T, T, dtype=torch.float32, device=cols.device)
    for _, b, lo, hi in _segments(layout, start, cols.shape[1]):
        grams[b] += gram(cols[:, lo:hi])
    return grams


def combine_columns(cols: torch.Tensor, start: int, layout: Layout, weights: torch.Tensor) -> torch.Tensor:
    """combined[c] = sum_t weights[block(c), t] * cols[t, c]: [T, n] -> [n] fp32."""
    out = torch.zeros(cols.shape[1], dtype=torch.float32, device=cols.device)  # columns of no factor stay 0
    w = weights.to(device=cols.device, dtype=torch.float32)
    for _, b, lo, hi in _segments(layout, start, cols.shape[1]):
        torch.mv(cols[:, lo:hi].t(), w[b], out=out[lo:hi])
    return out


def gram_telemetry(grams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block: fraction of task pairs with g_i . g_j < 0, and their mean cosine (pairs with both norms > 0)."""
    T = grams.shape[-1]
    if T < 2:
        zero = torch.zeros(grams.shape[0], dtype=torch.float64)
        return zero, zero
    G = grams.double().cpu()
    norms = torch.diagonal(G, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    iu = torch.triu_indices(T, T, offset=1)
    dots = G[:, iu[0], iu[1]]
    denom = norms[:, iu[0]] * norms[:, iu[1]]
    valid = denom > 0
    cos = torch.where(valid, dots / torch.where(valid, denom, 1.0), 0.0)
    count = valid.sum(-1).clamp_min(1)
    conflict = ((dots < 0) & valid).sum(-1) / count
    return conflict.double(), cos.sum(-1) / count
