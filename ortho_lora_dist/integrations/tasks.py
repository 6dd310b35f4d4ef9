"""The task column of an HF dataset: names -> indices (checked before training), kept through the collator."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


def task_index(dataset, column: str, names: Sequence[str] | None) -> tuple[list[str], dict[Any, int]]:
    """(task names, {value in the column: task index}); a missing column or an unknown value is a ValueError naming
    it (and the first row holding it). Ints are indices into ``names`` (default 0..max); strings are names (default:
    the sorted distinct values)."""
    cols = getattr(dataset, "column_names", None)
    if cols is None:
        raise ValueError("MultiTaskTrainer: train_dataset must be a datasets.Dataset (it needs a task column)")
    if column not in cols:
        raise ValueError(f"MultiTaskTrainer: train_dataset has no task column {column!r} (columns: {', '.join(cols)})")
    values = dataset[column]
    if not values:
        raise ValueError("MultiTaskTrainer: train_dataset is empty")
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    if not ints and not all(isinstance(v, str) for v in values):
        bad = next(i for i, v in enumerate(values) if not isinstance(v, (int, str)) or isinstance(v, bool))
        raise ValueError(f"MultiTaskTrainer: {column!r} must hold ints or task names; row {bad} has {values[bad]!r}")
    if names is None:
        names = [str(i) for i in range(max(values) + 1)] if ints else sorted(set(values))
    names = list(names)
    if len(set(names)) != len(names):
        raise ValueError(f"MultiTaskTrainer: task_names has duplicates: {names}")
    index: dict[Any, int] = {i: i for i in range(len(names))} if ints else {n: i for i, n in enumerate(names)}
    for row, v in enumerate(values):
        if v not in index:
            want = f"0..{len(names) - 1}" if ints else ", ".join(names)
            raise ValueError(f"MultiTaskTrainer: row {row} of {column!r} has task {v!r}, not one of {want}")
    return names, index


class TaskCollator:
    """Wraps a collator: takes the task column out of every example, collates the rest, adds the task indices under
    ``key``: [B] per sample, or [1, N] per token when the inner collator flattened the batch into one row
    (padding-free, ``position_ids``)."""

    def __init__(self, inner: Callable, column: str, index: dict[Any, int], key: str) -> None:
        self.inner, self.column, self.index, self.key = inner, column, index, key

    def __call__(self, examples: list[dict]) -> dict:
        tasks = [self.index[e[self.column]] for e in examples]
        batch = self.inner([{k: v for k, v in e.items() if k != self.column} for e in examples])
        ids = batch["input_ids"]
        if ids.shape[0] == 1 and len(examples) > 1:  # padding-free: one row of all examples, one after another
            lengths = [len(e["input_ids"]) for e in examples]
            per_token = torch.full(ids.shape, -1, dtype=torch.long)
            per_token[0, : sum(lengths)] = torch.repeat_interleave(torch.tensor(tasks), torch.tensor(lengths))
            batch[self.key] = per_token
        else:
            batch[self.key] = torch.tensor(tasks)
        return batch


class TaskBalancedSampler(torch.utils.data.Sampler):
    """Indices in runs of T, one sample of every task per run, each task's samples in a seeded reshuffle per pass;
    an epoch is one pass over the LARGEST task (smaller ones cycle), as ``ortho-lora train``'s equal sampling."""

    def __init__(self, tasks: Sequence[int], seed: int = 0) -> None:
        self.by_task: dict[int, list[int]] = {}
        for i, t in enumerate(tasks):
            self.by_task.setdefault(t, []).append(i)
        self.seed, self.epoch = seed, 0
        self.longest = max(len(v) for v in self.by_task.values())

    def __len__(self) -> int:
        return self.longest * len(self.by_task)

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        streams = []
        for t in sorted(self.by_task):
            rows = self.by_task[t]
            order: list[int] = []
            while len(order) < self.longest:
                order += [rows[j] for j in torch.randperm(len(rows), generator=gen).tolist()]
            streams.append(order[: self.longest])
        for k in range(self.longest):
            for stream in streams:
                yield stream[k]
