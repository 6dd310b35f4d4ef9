"""Block-wise Gram matrices and combination over one region (flat [T * n], whole factors) of the buffer.

A rank holding one region gets partial Gram matrices of the blocks that span several regions; the
global one is their sum over ranks (G = sum over regions of g_r g_r^T), so only [B, T, T] tensors
need to cross ranks.
"""

from __future__ import annotations

import torch

from .layout import Layout, factor_rows
from .projection import fp32_gram_ok, fp64_grams, gram_fp64


def block_grams(region: torch.Tensor, index: int, layout: Layout, num_tasks: int) -> torch.Tensor:
    """Flat [T * n] region ``index`` -> [B, T, T] fp64 (partial) block Gram matrices (precision: projection.gram).

    CPU: every factor's Gram in fp32 into one [F, T, T] tensor, one range check, fp64 recomputation of the
    factors outside FP32_GRAM_RANGE only. CUDA: fp64 throughout (no per-factor synchronisation).
    """
    T = num_tasks
    grams = torch.zeros(layout.num_blocks, T, T, dtype=torch.float64, device=region.device)
    facs = layout.region_factors(index)
    if not facs:
        return grams
    if fp64_grams(region):
        for f, b in facs:
            grams[b] += gram_fp64(factor_rows(region, f, T))
        return grams
    per = torch.empty(len(facs), T, T, dtype=torch.float32, device=region.device)
    for i, (f, _) in enumerate(facs):
        rows = factor_rows(region, f, T).float()
        torch.mm(rows, rows.t(), out=per[i])
    per64 = per.double()
    for i in (~fp32_gram_ok(per)).nonzero().flatten().tolist():
        per64[i] = gram_fp64(factor_rows(region, facs[i][0], T))
    return grams.index_add_(0, torch.tensor([b for _, b in facs], device=region.device), per64)


# |w| outside [2^-FP32_SAFE, 2^FP32_SAFE] (e.g. a task 1e30 times smaller than another in the block) would not
# survive a cast to fp32: such blocks are combined in fp64 (their [T, numel] copy only), all others in fp32.
FP32_SAFE = 120


def combine_region(region: torch.Tensor, index: int, layout: Layout, weights: torch.Tensor) -> torch.Tensor:
    """combined[c] = sum_t weights[block(c), t] * g_t[c] over the region's columns: -> [n] fp32 (padding 0)."""
    T = weights.shape[-1]
    out = torch.zeros(layout.region_size, dtype=torch.float32, device=region.device)
    w64 = weights.to(device=region.device, dtype=torch.float64)
    w = w64.float()
    a = w64.abs()
    fp32_ok = ((a <= 2.0**FP32_SAFE) & ((a == 0) | (a >= 2.0**-FP32_SAFE))).all(-1).tolist()
    for f, b in layout.region_factors(index):
        rows, dst = factor_rows(region, f, T), out[f.offset : f.offset + f.numel]
        if fp32_ok[b]:
            torch.mv(rows.t(), w[b], out=dst)
        else:
            dst.copy_(torch.mv(rows.t().double(), w64[b]))
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
