"""The slow, obviously-correct way: T separate backward passes (the paper's Algorithm 1).

g_t = d(task_losses[t]) / d(params), one task at a time, by ``backward(retain_graph=True)`` on the
shared forward graph and reading ``.grad`` (not ``torch.autograd.grad``: reentrant gradient
checkpointing, which bitsandbytes setups use, supports only ``backward``; ``autograd.grad`` would
silently miss every parameter inside a checkpointed block). Used as ground truth by the tests and as
the baseline of the benchmarks; single process only (engine hooks would fire on ``.grad``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def reference_task_grads(task_losses: torch.Tensor, params: Sequence[nn.Parameter]) -> torch.Tensor:
    """[T] task losses -> [T, P] per-task gradients of ``params`` (flattened in order), fp32."""
    params = list(params)
    saved = [p.grad for p in params]  # leave existing gradients as they were
    num_tasks = task_losses.numel()
    rows = []
    try:
        for t in range(num_tasks):
            for p in params:
                p.grad = None
            if task_losses[t].requires_grad:
                task_losses[t].backward(retain_graph=t < num_tasks - 1)
            rows.append(
                torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).float().reshape(-1) for p in params])
            )
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    return torch.stack(rows)
