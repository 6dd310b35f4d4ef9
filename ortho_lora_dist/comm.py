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

    def reduce_task_grads(self, buffer: torch.Tensor) -> torch.Tensor:
        """Local [N, T, n] per-task sums -> region ``rank`` ([T, n]) of the global per-task mean over ranks."""

    def sum_grams(self, grams: torch.Tensor) -> torch.Tensor:
        """Partial [B, T, T] Gram matrices of this rank's region -> the global ones (sum over ranks)."""

    def gather_regions(self, combined: torch.Tensor) -> torch.Tensor:
        """This rank's combined region [n] -> all regions [N, n], on every rank."""

    def mean_(self, tensors: list[torch.Tensor]) -> None:
        """Average tensors (e.g. task-head gradients) across ranks, in place."""


class LocalComm:
    """One process: the single region is the whole buffer, nothing to reduce."""

    world_size = 1
    rank = 0

    def reduce_task_grads(self, buffer: torch.Tensor) -> torch.Tensor:
        return buffer[0]

    def sum_grams(self, grams: torch.Tensor) -> torch.Tensor:
        return grams

    def gather_regions(self, combined: torch.Tensor) -> torch.Tensor:
        return combined.unsqueeze(0)

    def mean_(self, tensors: list[torch.Tensor]) -> None:
        return None
