"""Evaluation: every rank predicts its share (same number of forward calls on every rank, as FSDP
needs), rank 0 gathers predictions and computes each task's metric."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .data import TaskData
from .metrics import compute
from .setup import DistInfo


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(
    model, tasks: list[TaskData], split: str, info: DistInfo, batch_size: int, should_stop: Callable[[], bool] | None = None
) -> dict[str, float | None] | None:
    """{task: metric} (rank 0; other ranks get {}) plus the unweighted average under "average".

    A task with any non-finite model output gets None (never a number computed from NaN). ``should_stop``
    is called before every batch on every rank (it may be collective); when it says stop, returns None.
    """
    was_training = model.training
    model.eval()
    results: dict[str, float] = {}
    for t, task in enumerate(tasks):
        records = task.splits.get(split)
        if not records:
            continue
        share = math.ceil(len(records) / info.world)
        mine = list(range(info.rank * share, min(len(records), (info.rank + 1) * share)))
        padded = mine + [0] * (share - len(mine))  # equal forward calls on every rank; pads dropped below
        preds: list = []
        for lo in range(0, share, batch_size):
            if should_stop is not None and should_stop():
                model.train(was_training)
                return None
            idx = padded[lo : lo + batch_size]
            batch = _to(model.collate([records[i] for i in idx], [t] * len(idx)), info.device)
            preds += model.predict(batch)
        preds = preds[: len(mine)]
        if info.world > 1:
            import torch.distributed as dist

            gathered: list = [None] * info.world
            dist.all_gather_object(gathered, preds)
            preds = [p for part in gathered for p in part]
        if info.main:
            finite = all(p is not None and (not isinstance(p, float) or math.isfinite(p)) for p in preds)
            results[task.name] = compute(task.config.metric, [r["label"] for r in records], preds) if finite else None
    if results:
        values = list(results.values())
        results["average"] = None if any(v is None for v in values) else sum(values) / len(values)
    model.train(was_training)
    return results
