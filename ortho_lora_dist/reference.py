"""The slow, obviously-correct way: T separate backward passes (the paper's Algorithm 1).

g_t = d(task_losses[t]) / d(params) by ``torch.autograd.grad`` on the retained graph, one task at a
time. Used as ground truth by the tests and as the baseline of the benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def reference_task_grads(task_losses: torch.Tensor, params: Sequence[nn.Parameter]) -> torch.Tensor:
    """[T] task losses -> [T, P] per-task gradients of ``params`` (flattened in order), fp32."""
    num_tasks = task_losses.numel()
    rows = []
    for t in range(num_tasks):
        loss_t = task_losses[t]
        if loss_t.requires_grad:
            grads = torch.autograd.grad(loss_t, list(params), retain_graph=t < num_tasks - 1, allow_unused=True)
        else:
            grads = (None,) * len(params)
        rows.append(
            torch.cat([(torch.zeros_like(p) if g is None else g).float().reshape(-1) for p, g in zip(params, grads)])
        )
    return torch.stack(rows)
