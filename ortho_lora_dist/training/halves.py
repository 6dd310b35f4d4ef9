"""Every task's samples of a micro-batch split in two halves for the capture (study/diagnose.py, core/noise.py):
capture groups 2t + (the row's position among task t's rows, mod 2), a fixed rule independent of the data."""

from __future__ import annotations

import torch
from torch import nn

from ortho_lora_dist.models.lm_head import labelled_tasks


def halved(batch: dict) -> dict:
    """The padded batch with capture groups in ``task_ids`` (and ``labelled_task_ids``); the model's loss still reads
    the real task ids, kept under ``tasks_of``."""
    tasks = batch["task_ids"]
    position = torch.zeros_like(tasks)
    for t in tasks.unique():
        rows = (tasks == t).nonzero().flatten()
        position[rows] = torch.arange(rows.numel(), device=tasks.device)
    groups = 2 * tasks + position % 2
    out = {**batch, "task_ids": groups, "tasks_of": {"task_ids": tasks}}
    if "labelled_task_ids" in batch:
        out["labelled_task_ids"] = labelled_tasks(batch["labels"], groups)
        out["tasks_of"]["labelled_task_ids"] = batch["labelled_task_ids"]
    return out


def group_counts(model: nn.Module, batch: dict, num_tasks: int) -> torch.Tensor:
    """[2, 2T]: labelled units and samples of every half-group of a ``halved`` batch (this rank)."""
    G = 2 * num_tasks
    units = model.task_counts(batch)  # by group: the halved batch's ids
    samples = torch.bincount(batch["task_ids"].cpu(), minlength=G).double()
    return torch.stack([torch.nn.functional.pad(units, (0, G - units.numel())), samples])
