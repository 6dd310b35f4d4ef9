"""Task sampling as in the paper: every optimizer step sees one batch from EVERY task.

Each task has its own seeded stream of shuffled passes over its training set. A global micro-batch
takes the next ``batch * world`` indices of every task's stream; rank r keeps the r-th contiguous
chunk, so N ranks together see exactly what one process with ``batch * N`` per task would see.
An epoch is one pass over the LARGEST task: steps_per_epoch = ceil(max_t n_t / (batch * world * accum));
smaller tasks cycle through reshuffled passes. Positions are saved in checkpoints for exact resume.
"""

from __future__ import annotations

import math

import torch


class TaskStream:
    """Endless shuffled passes over range(n); pass p uses the permutation seeded by (seed, task, p)."""

    def __init__(self, n: int, seed: int, task: int) -> None:
        self.n, self.seed, self.task = n, seed, task
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.task * 10_007 + self.epoch)
        return torch.randperm(self.n, generator=gen).tolist()

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._permutation()
            m = min(k - len(out), self.n - self.pos)
            out += self._perm[self.pos : self.pos + m]
            self.pos += m
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._perm = self._permutation()


class MultiTaskSampler:
    """Yields this rank's records and task ids of one micro-batch: ``batch`` samples of each task, task-sorted."""

    def __init__(self, sizes: list[int], batch: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.sizes, self.batch, self.rank, self.world = sizes, batch, rank, world
        self.streams = [TaskStream(n, seed, t) for t, n in enumerate(sizes)]

    def steps_per_epoch(self, accum: int) -> int:
        return max(1, math.ceil(max(self.sizes) / (self.batch * self.world * accum)))

    def next(self) -> list[tuple[int, int]]:
        """[(task, index)] of this rank's share of the next global micro-batch, grouped by task."""
        out = []
        for t, stream in enumerate(self.streams):
            idx = stream.take(self.batch * self.world)
            out += [(t, i) for i in idx[self.rank * self.batch : (self.rank + 1) * self.batch]]
        return out

    def state_dict(self) -> dict:
        return {"streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict) -> None:
        for s, st in zip(self.streams, state["streams"]):
            s.load_state_dict(st)
