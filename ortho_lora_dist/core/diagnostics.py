"""Diagnostics of the block Gram matrices: pairwise cosines, conflict rates, and leverage (how much a rule changes
the update), each an exact function of the Grams G_b and the combination weights w_b.

With block Grams G_b (T x T) and combination weights w_b, the combined gradient is c = (sum_t w_bt g_bt)_b and
the joint one j = (sum_t g_bt)_b. Every quantity below is an exact function of (G, w):

    ||c||^2 = sum_b w_b^T G_b w_b      c . j = sum_b 1^T G_b w_b      ||j||^2 = sum_b 1^T G_b 1
    g_t . c = sum_b (G_b w_b)_t        ||g_t||^2 = sum_b (G_b)_tt

Reported: relative change ||c - j|| / ||j||, cos(c, j), each task's first-order gain g_t . c / ||g_t||^2
(negative: the update pushes that task backwards; 1 for every task when c = g_t-orthogonal sum), and each
task's share of sum_t ||g_t||^2.
"""

from __future__ import annotations

import math

import torch


def leverage(grams: torch.Tensor, weights: torch.Tensor) -> dict:
    """[B, T, T] Grams and [B, T] weights -> {"change", "cos_joint", "gain": [T], "share": [T]} (floats)."""
    G, w = grams.double().cpu(), weights.double().cpu()
    Gw = (G @ w.unsqueeze(-1)).squeeze(-1)  # [B, T]
    cc = float((w * Gw).sum())
    cj = float(Gw.sum())
    jj = float(G.sum((-1, -2)).sum())
    sq = torch.diagonal(G, dim1=-2, dim2=-1).sum(0)  # [T] ||g_t||^2
    diff = max(cc - 2 * cj + jj, 0.0)
    change = math.sqrt(diff / jj) if jj > 0 else float("nan")
    cos = cj / math.sqrt(cc * jj) if cc > 0 and jj > 0 else float("nan")
    gain = torch.where(sq > 0, Gw.sum(0) / torch.where(sq > 0, sq, 1.0), torch.nan)
    total = float(sq.sum())
    share = sq / total if total > 0 else torch.full_like(sq, torch.nan)
    return {"change": change, "cos_joint": cos, "gain": gain.tolist(), "share": share.tolist()}


def _pairs(grams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T, T] -> (dots g_i . g_j, products ||g_i|| ||g_j||), each [B, T(T-1)/2] over the pairs i < j (fp64, CPU)."""
    G = grams.double().cpu()
    T = G.shape[-1]
    iu = torch.triu_indices(T, T, offset=1)
    norms = torch.diagonal(G, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    return G[:, iu[0], iu[1]], norms[:, iu[0]] * norms[:, iu[1]]


def pair_cosines(grams: torch.Tensor) -> torch.Tensor:
    """Per block, cos(g_i, g_j) for every task pair i < j (0 where a norm is 0): [B, T, T] -> [B, T(T-1)/2]."""
    dots, denom = _pairs(grams)
    return torch.where(denom > 0, dots / torch.where(denom > 0, denom, 1.0), 0.0)


def gram_telemetry(grams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block: fraction of task pairs with g_i . g_j < 0, and their mean cosine (pairs with both norms > 0)."""
    if grams.shape[-1] < 2:
        zero = torch.zeros(grams.shape[0], dtype=torch.float64)
        return zero, zero
    dots, denom = _pairs(grams)
    valid = denom > 0
    cos = torch.where(valid, dots / torch.where(valid, denom, 1.0), 0.0)
    count = valid.sum(-1).clamp_min(1)
    conflict = ((dots < 0) & valid).sum(-1) / count
    return conflict.double(), cos.sum(-1) / count
