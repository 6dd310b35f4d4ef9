"""Gram matrices of task gradients, G = g g^T in fp64: the one quantity every strategy is a function of.

Formed per factor / block by blocks.py and summed across ranks; their diagnostics (cosines, conflict,
leverage) are in diagnostics.py.
"""

from __future__ import annotations

import torch

__all__ = ["FP32_GRAM_RANGE", "fp32_gram_ok", "fp64_grams", "gram", "gram_fp64"]


# Squares of fp32 numbers under- or overflow fp32 outside this range of ||g_t||^2 (see gram()).
FP32_GRAM_RANGE = (2.0**-60, 2.0**100)


def gram(grads: torch.Tensor) -> torch.Tensor:
    """G = grads @ grads^T as fp64, whatever the input dtype: [..., T, D] -> [..., T, T].

    fp32 Grams fail on scale: a task of norm 1e-24 has ||g||^2 = 1e-48, 0 in fp32 (never projected against),
    and a norm above ~1.8e19 overflows (a skipped step). In fp64 every product of two fp32 numbers is exact and
    no square of one leaves the range. On CUDA (and for fp64 inputs) the Gram is accumulated in fp64: the
    skinny matmul is memory-bound there, and TF32 cannot touch it. On CPU, where fp64 GEMMs of this shape are
    ~4x slower than fp32, it is formed in fp32 and recomputed in fp64 only if a diagonal leaves FP32_GRAM_RANGE
    (inside it no product or partial sum of the fp32 accumulation under- or overflows).
    """
    if fp64_grams(grads):
        return gram_fp64(grads)
    g = grads.float()
    G = g @ g.transpose(-1, -2)
    return G.double() if bool(fp32_gram_ok(G).all()) else gram_fp64(grads)


def fp64_grams(grads: torch.Tensor) -> bool:
    """Whether Grams of ``grads`` are accumulated in fp64 directly (CUDA, fp64 input) rather than fp32-first."""
    return grads.device.type == "cuda" or grads.dtype == torch.float64


def gram_fp64(grads: torch.Tensor) -> torch.Tensor:
    """G = grads @ grads^T accumulated in fp64: [..., T, D] -> [..., T, T]."""
    g = grads.double()
    return g @ g.transpose(-1, -2)


def fp32_gram_ok(grams: torch.Tensor) -> torch.Tensor:
    """[..., T, T] fp32 Grams -> [...] bool: every diagonal inside FP32_GRAM_RANGE (NaN / inf: False)."""
    d = torch.diagonal(grams, dim1=-2, dim2=-1)
    return ((d >= FP32_GRAM_RANGE[0]) & (d <= FP32_GRAM_RANGE[1])).all(-1)
