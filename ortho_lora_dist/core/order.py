"""The per-step random task order, from an explicit generator seeded identically on every rank."""

from __future__ import annotations

import torch


class TaskOrder:
    """Draws one permutation of range(T) per optimizer step; same seed -> same sequence on every rank."""

    def __init__(self, num_tasks: int, seed: int) -> None:
        self.num_tasks = num_tasks
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(int(seed))

    def next(self) -> list[int]:
        return torch.randperm(self.num_tasks, generator=self.generator).tolist()

    def state_dict(self) -> dict:
        return {"num_tasks": self.num_tasks, "rng": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if state["num_tasks"] != self.num_tasks:
            raise ValueError(f"task order state is for {state['num_tasks']} tasks, this run has {self.num_tasks}")
        self.generator.set_state(state["rng"])
