"""Task sampling: every micro-batch is task-labelled and grouped by task (what the per-task capture needs).

Each task has its own seeded stream of shuffled passes over its training set.

``equal`` (the paper; default): a global micro-batch takes the next ``batch * world`` indices of every task's
stream; rank r keeps the r-th contiguous chunk, so N ranks together see exactly what one process with
``batch * N`` per task would see. An epoch is one pass over the LARGEST task:
steps_per_epoch = ceil(max_t n_t / (batch * world * accum)); smaller tasks cycle through reshuffled passes.

``proportional`` / ``temperature``: a micro-batch holds ``batch * T`` samples per rank; how many of each task,
k_t, is drawn for every micro-batch (multinomial, ``batch * T`` draws with p_t ~ n_t^(1/temperature);
proportional is temperature 1) from a generator seeded by (seed, micro-batch number), so every rank draws the
same k and a resumed run draws what the uninterrupted one did. Every rank gets k_t samples of task t (the
global micro-batch has k_t * world of them, rank r the r-th chunk of the task's next k_t * world indices): the
task's loss normalises by its global count in the step (training/recipe.py), as in ``equal``. A task with
k_t = 0 is absent from the micro-batch: its loss is 0 and it adds no gradient there. An epoch is as many samples
as all tasks together: steps_per_epoch = ceil(sum_t n_t / (batch * T * world * accum)).

``weighted``: as proportional, with p_t ~ ``tasks.N.sampling_weight`` (explicit mixing weights).

``max_epochs`` (``tasks.N.max_epochs``, any mode): a task whose stream has delivered max_epochs x n_t samples drops out
of every later micro-batch (equal: it gets 0 samples; the others: its probability goes to the tasks left), so a small
task is not repeated hundreds of times while the largest one runs its epochs. ``plan`` says before training what an
epoch is and how often each task is seen.

Positions (and the number of micro-batches drawn) are saved in checkpoints for exact resume.
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


MODES = ("equal", "proportional", "temperature", "weighted")


def task_probabilities(
    sizes: list[int], mode: str, temperature: float = 1.0, weights: list[float] | None = None
) -> list[float]:
    """p_t ~ n_t^(1/temperature) (proportional: temperature 1; equal: 1/T; weighted: p_t ~ weights_t)."""
    if mode not in MODES:
        raise ValueError(f"task sampling must be one of {MODES}, got {mode!r}")
    if mode == "equal":
        return [1.0 / len(sizes)] * len(sizes)
    if mode == "weighted":
        w = list(weights or [1.0] * len(sizes))
    else:
        tau = 1.0 if mode == "proportional" else float(temperature)
        w = [n ** (1.0 / tau) for n in sizes]
    return [x / sum(w) for x in w]


class MultiTaskSampler:
    """Yields this rank's records and task ids of one micro-batch, task-sorted: ``batch`` samples of each task
    (equal), or ``batch * T`` samples shared by a seeded draw (proportional / temperature)."""

    def __init__(
        self,
        sizes: list[int],
        batch: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        mode: str = "equal",
        temperature: float = 2.0,
        weights: list[float] | None = None,
        max_epochs: list[float | None] | None = None,
    ) -> None:
        self.sizes, self.batch, self.rank, self.world, self.seed = sizes, batch, rank, world, seed
        self.mode = mode
        self.probs = task_probabilities(sizes, mode, temperature, weights)
        self.caps = [None if m is None else math.ceil(m * n) for m, n in zip(max_epochs or [None] * len(sizes), sizes)]
        self.streams = [TaskStream(n, seed, t) for t, n in enumerate(sizes)]
        self.draws = 0  # micro-batches drawn (proportional / temperature / weighted)

    def seen(self, task: int) -> int:
        """Samples of ``task`` its stream has delivered (all ranks together)."""
        s = self.streams[task]
        return s.epoch * s.n + s.pos

    def active(self) -> list[bool]:
        """The tasks not yet at their max_epochs cap (the same on every rank: the streams are global)."""
        return [cap is None or self.seen(t) < cap for t, cap in enumerate(self.caps)]

    def steps_per_epoch(self, accum: int) -> int:
        if self.mode == "equal":
            return max(1, math.ceil(max(self.sizes) / (self.batch * self.world * accum)))
        return max(1, math.ceil(sum(self.sizes) / (self.batch * len(self.sizes) * self.world * accum)))

    def allocation(self, draw: int) -> list[int]:
        """Samples of each task per rank in micro-batch number ``draw`` (same on every rank); tasks past their cap
        get none."""
        T, active = len(self.sizes), self.active()
        if not any(active):
            raise RuntimeError(
                "every task has reached its tasks.N.max_epochs: nothing left to train on; the run's steps or epochs "
                "exceed what the caps allow (see the epoch plan logged at start)"
            )
        if self.mode == "equal":
            counts = [self.batch if a else 0 for a in active]
        else:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 7_919 + draw * 104_729)
            probs = torch.tensor([p if a else 0.0 for p, a in zip(self.probs, active)], dtype=torch.float64)
            picks = torch.multinomial(probs / probs.sum(), self.batch * T, replacement=True, generator=gen)
            counts = torch.bincount(picks, minlength=T).tolist()
        # a task near its cap takes what is left (rounded up to whole samples per rank), not a whole share
        return [
            k if cap is None else min(k, -(-(cap - self.seen(t)) // self.world))
            for t, (k, cap) in enumerate(zip(counts, self.caps))
        ]

    def plan(self, steps: int, accum: int, names: list[str]) -> str:
        """What the run's steps mean, before training: global batch, and per task its size, the samples it will
        be seen (expected, for random modes; capped by max_epochs) and how many passes over it that is."""
        T, per_step = len(self.sizes), self.batch * self.world * accum
        lines = [
            f"epoch plan: {steps} steps of {self.steps_per_epoch(accum)} per epoch ({self.mode} sampling); per step "
            f"{per_step * (T if self.mode != 'equal' else 1)} samples"
            + (" of each task" if self.mode == "equal" else " in all")
            + f" ({self.batch} per rank x {self.world} ranks x {accum} accumulation"
            + (")" if self.mode == "equal" else f" x {T} tasks)")
        ]
        for t, (name, n) in enumerate(zip(names, self.sizes)):
            share = per_step if self.mode == "equal" else per_step * T * self.probs[t]
            seen = share * steps if self.caps[t] is None else min(share * steps, self.caps[t])
            capped = "" if self.caps[t] is None else f", capped at {self.caps[t]:,} (max_epochs)"
            about = "" if self.mode == "equal" else "~"
            lines.append(f"  {name}: {n:,} samples, {about}{seen:,.0f} seen = {seen / n:.2f} passes{capped}")
        return "\n".join(lines)

    def next(self) -> list[tuple[int, int]]:
        """[(task, index)] of this rank's share of the next global micro-batch, grouped by task."""
        counts = self.allocation(self.draws)
        if self.mode != "equal":
            self.draws += 1
        out = []
        for t, (stream, k) in enumerate(zip(self.streams, counts)):
            if k == 0:
                continue
            idx = stream.take(k * self.world)
            out += [(t, i) for i in idx[self.rank * k : (self.rank + 1) * k]]
        return out

    def state_dict(self) -> dict:
        state: dict = {"streams": [s.state_dict() for s in self.streams]}
        if self.mode != "equal":
            state["draws"] = self.draws
        return state

    def load_state_dict(self, state: dict) -> None:
        for s, st in zip(self.streams, state["streams"]):
            s.load_state_dict(st)
        self.draws = int(state.get("draws", 0))
