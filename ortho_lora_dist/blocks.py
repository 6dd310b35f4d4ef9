"""Block-wise Gram matrices and combination over one region (flat [T * n], whole factors) of the buffer.

A rank holding one region gets partial Gram matrices of the blocks that span several regions; the
global one is their sum over ranks (G = sum over regions of g_r g_r^T), so only [B, T, T] tensors
need to cross ranks.
"""

from __future__ import annotations

import torch

from .layout import Layout, factor_rows
from .projection import gram


def block_grams(region: torch.Tensor, index: int, layout: Layout, num_tasks: int) -> torch.Tensor:
    """Flat [T * n] region ``index`` -> [B, T, T] fp32 (partial) block Gram matrices."""
    T = num_tasks
    grams = torch.zeros(layout.num_blocks, T, T, dtype=torch.float32, device=region.device)
    for f, b in layout.region_factors(index):
        grams[b] += gram(factor_rows(region, f, T))
    return grams


def combine_region(region: torch.Tensor, index: int, layout: Layout, weights: torch.Tensor) -> torch.Tensor:
    """combined[c] = sum_t weights[block(c), t] * g_t[c] over the region's columns: -> [n] fp32 (padding 0)."""
    T = weights.shape[-1]
    out = torch.zeros(layout.region_size, dtype=torch.float32, device=region.device)
    w = weights.to(device=region.device, dtype=torch.float32)
    for f, b in layout.region_factors(index):
        torch.mv(factor_rows(region, f, T).t(), w[b], out=out[f.offset : f.offset + f.numel])
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
