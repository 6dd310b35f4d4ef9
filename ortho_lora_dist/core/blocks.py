"""Block-wise Gram matrices and combination over one region (flat [T * n], whole factors) of the buffer.

A rank holding one region gets partial Gram matrices of the blocks that span several regions; the
global one is their sum over ranks (G = sum over regions of g_r g_r^T), so only [B, T, T] tensors
need to cross ranks.
"""

from __future__ import annotations

import torch

from ortho_lora_dist.core.gram import fp32_gram_ok, fp64_grams, gram_fp64
from ortho_lora_dist.core.layout import Layout, factor_rows


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
