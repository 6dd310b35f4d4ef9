"""How the per-task buffer and the Gram matrices cross ranks. The single-process case is the identity.

Where reduction happens relative to projection (the one rule every engine follows): per-task
gradients are reduced across ranks FIRST (each task separately), the Gram matrices are formed from
those global per-task gradients, and only then is the non-linear projection applied, with the same
order on every rank, so that every rank projects the same numbers.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Comm(Protocol):
    world_size: int
    rank: int

    def reduce_task_grads(self, buffer: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Local [T, P] per-task sums -> (global per-task mean over ranks of the columns this rank holds, first column)."""

    def sum_grams(self, grams: torch.Tensor) -> torch.Tensor:
        """Partial [B, T, T] Gram matrices of this rank's columns -> the global ones (sum over ranks)."""

    def gather_columns(self, cols: torch.Tensor, start: int, total: int) -> torch.Tensor:
        """This rank's combined columns -> all ``total`` columns, on every rank."""

    def mean_(self, tensors: list[torch.Tensor]) -> None:
        """Average tensors (e.g. task-head gradients) across ranks, in place."""


class LocalComm:
    """One process: every column is local, nothing to reduce."""

    world_size = 1
    rank = 0

    def reduce_task_grads(self, buffer: torch.Tensor) -> tuple[torch.Tensor, int]:
        return buffer, 0

    def sum_grams(self, grams: torch.Tensor) -> torch.Tensor:
        return grams

    def gather_columns(self, cols: torch.Tensor, start: int, total: int) -> torch.Tensor:
        return cols

    def mean_(self, tensors: list[torch.Tensor]) -> None:
        return None
