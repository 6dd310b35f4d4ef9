"""Per-task losses of a mixed batch: the mean over the samples (or tokens) of each task."""

from __future__ import annotations

import torch


def task_mean(
    values: torch.Tensor, task_ids: torch.Tensor, num_tasks: int, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """L_t = sum_{s in t} w_s v_s / sum_{s in t} w_s for every task: [N] values -> [T] (0 for absent tasks).

    ``weights`` (e.g. a token mask) default to 1; ``task_ids`` gives the task of every value.
    """
    total, count = task_sum(values, task_ids, num_tasks, weights)
    return total / count.clamp_min(torch.finfo(values.dtype).tiny)


def task_sum(
    values: torch.Tensor, task_ids: torch.Tensor, num_tasks: int, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_{s in t} w_s v_s, sum_{s in t} w_s) for every task: the parts of ``task_mean`` that add across
    batches/ranks."""
    values = values.reshape(-1)
    task_ids = task_ids.reshape(-1).to(values.device)
    w = torch.ones_like(values) if weights is None else weights.reshape(-1).to(values.dtype)
    total = torch.zeros(num_tasks, dtype=values.dtype, device=values.device).index_add(0, task_ids, values * w)
    count = torch.zeros(num_tasks, dtype=values.dtype, device=values.device).index_add(0, task_ids, w)
    return total, count


def step_mean_part(sums: torch.Tensor, step_counts: torch.Tensor, world: int) -> torch.Tensor:
    """world * s_t / n_t [T]: this rank's micro-batch part of the step's per-task mean L_t = sum_all / n_t.

    ``sums`` [T]: this rank's per-task loss sums over one micro-batch; ``step_counts`` [T]: the number of task t's
    labelled units (answer tokens, samples) in the WHOLE optimizer step, every micro-batch of every rank (all-reduced).
    Averaged over ranks (the reduction's mean) and summed over micro-batches these parts give L_t exactly, whatever
    the split into ranks and micro-batches: no mean of per-rank or per-micro-batch means (their weighting differs
    as soon as answers differ in length or a task's sample count differs between micro-batches)."""
    counts = step_counts.to(sums.device, sums.dtype)
    return world * sums / counts.clamp_min(1)
