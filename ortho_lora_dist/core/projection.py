"""Ortho-LoRA projection (arXiv 2601.09684, Algorithm 1) as pure functions on Gram matrices.

For one block with task gradients g_1..g_T (rows of a [T, D] tensor) and a task order pi:

    for i in pi:  g_i' = g_i;  for j in pi without i:  if g_i' . g_j < 0:  g_i' -= (g_i' . g_j / ||g_j||^2) g_j
    combined = sum_i g_i'

The j-side vectors are the ORIGINAL gradients (PCGrad, Yu et al. 2020). Every g_i' stays a linear
combination sum_k c_ik g_k, and g_i' . g_j = (c_i^T G)_j with G the T x T Gram matrix, so the whole
projection is a function of G alone: ``combined = combine_weights(G, order) @ grads``. This is what makes
the distributed version exact while only T x T matrices cross ranks.

No torch.distributed, no modules, no hooks in this file.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ortho_lora_dist.core.gram import gram

__all__ = ["check_order", "combine_weights", "joint_weights", "project", "projection_coefficients"]


def check_order(order: Sequence[int], num_tasks: int) -> list[int]:
    """Return ``order`` as a list after checking it is a permutation of range(num_tasks)."""
    order = [int(i) for i in order]
    if sorted(order) != list(range(num_tasks)):
        raise ValueError(f"order must be a permutation of 0..{num_tasks - 1}, got {order}")
    return order


def projection_coefficients(gram_matrix: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
    """C with g_i' = sum_k C[i, k] g_k, from the Gram matrix alone: [..., T, T] -> [..., T, T].

    Leading dimensions are independent blocks projected with the same order. Computed in float64:
    the T x T work is negligible and the extra precision keeps the sign tests of near-ties stable.
    A task j with ||g_j|| = 0 is never projected against (nothing to divide by).
    """
    num_tasks = gram_matrix.shape[-1]
    order = check_order(order, num_tasks)
    G = gram_matrix.double()
    batch = G.shape[:-2]
    sq_norm = torch.diagonal(G, dim1=-2, dim2=-1)  # [..., T]
    coeffs = torch.eye(num_tasks, dtype=G.dtype, device=G.device).expand(*batch, num_tasks, num_tasks).clone()
    for i in order:
        c = coeffs[..., i, :]  # g_i' = g_i, updated in place
        for j in order:
            if j == i:
                continue
            dot = (c * G[..., :, j]).sum(-1)  # g_i' . g_j = (c^T G)_j
            norm_j = sq_norm[..., j]
            conflict = (dot < 0) & (norm_j > 0)
            c[..., j] -= torch.where(conflict, dot / torch.where(norm_j > 0, norm_j, 1.0), 0.0)
    return coeffs


def combine_weights(gram_matrix: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
    """Weights w with sum_i g_i' = sum_t w_t g_t: [..., T, T] -> [..., T] (column sums of the coefficients)."""
    return projection_coefficients(gram_matrix, order).sum(-2)


def joint_weights(gram_matrix: torch.Tensor) -> torch.Tensor:
    """Weights of the plain sum (joint training, the baseline): all ones, [..., T, T] -> [..., T]."""
    return torch.ones(gram_matrix.shape[:-1], dtype=torch.float64, device=gram_matrix.device)


def project(grads: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
    """Combined Ortho-LoRA gradient of one block: [T, D] task gradients -> [D] (combined in fp64), input dtype."""
    if grads.dim() != 2:
        raise ValueError(f"grads must be [T, D], got shape {tuple(grads.shape)}")
    w = combine_weights(gram(grads), order)
    return (w @ grads.double()).to(grads.dtype)
