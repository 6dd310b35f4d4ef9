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
        """Local [N, T * n] per-task sums -> region ``rank`` (flat [T * n]) of the global per-task mean over ranks."""

    def reduce_region(self, region: torch.Tensor, owner: int, async_op: bool = False):
        """Sum ``region`` over ranks into rank ``owner``'s copy (in place there); async_op: return a work handle."""

    def sum_grams(self, grams: torch.Tensor) -> torch.Tensor:
        """Partial [B, T, T] Gram matrices of this rank's region -> the global ones (sum over ranks)."""

    def gather_regions(self, combined: torch.Tensor) -> torch.Tensor:
        """This rank's combined region [n] -> all regions [N, n], on every rank."""

    def mean_(self, tensors: list[torch.Tensor], what: str = "all_reduce_heads") -> None:
        """Average tensors (task-head gradients; the losses of a loss-only rule) across ranks, in place."""


class LocalComm:
    """One process: the single region is the whole buffer, nothing to reduce."""

    world_size = 1
    rank = 0

    def reduce_task_grads(self, buffer: torch.Tensor) -> torch.Tensor:
        return buffer[0]

    def reduce_region(self, region: torch.Tensor, owner: int, async_op: bool = False):
        return None

    def sum_grams(self, grams: torch.Tensor) -> torch.Tensor:
        return grams

    def gather_regions(self, combined: torch.Tensor) -> torch.Tensor:
        return combined.unsqueeze(0)

    def mean_(self, tensors: list[torch.Tensor], what: str = "all_reduce_heads") -> None:
        return None


class DistComm:
    """torch.distributed data parallelism over ``group``: rank r owns region r of the [N, T, n] buffer.

    Bytes per step: reduce-scatter of T*N*n floats (each rank sends and receives (N-1)/N of it),
    all-reduce of the [B, T, T] Grams, and, for replicated LoRA parameters, an all-gather of N*n.
    """

    def __init__(self, group=None) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: launch with torchrun or deepspeed")
        self.dist, self.group = dist, group
        # torch >= 2.13 deprecates the *_tensor names (a FutureWarning on every rank) for *_single
        self._reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        self._all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.sent_bytes: dict[str, int] = {}  # bytes each rank sends, per collective (ring algorithms)
        self.calls: dict[str, int] = {}  # collectives launched, per kind

    def _count(self, name: str, full_bytes: int, factor: float) -> None:
        n = self.world_size
        self.calls[name] = self.calls.get(name, 0) + 1
        self.sent_bytes[name] = self.sent_bytes.get(name, 0) + int(full_bytes * factor * (n - 1) / n)

    def reduce_task_grads(self, buffer: torch.Tensor) -> torch.Tensor:
        if buffer.shape[0] != self.world_size:
            raise ValueError(f"buffer has {buffer.shape[0]} regions for {self.world_size} ranks")
        self._count("reduce_task_grads", buffer.numel() * buffer.element_size(), 1)
        out = torch.empty(buffer[0].numel(), dtype=buffer.dtype, device=buffer.device)
        self._reduce_scatter(out, buffer.reshape(-1), op=self.dist.ReduceOp.SUM, group=self.group)
        return out.div_(self.world_size)

    def reduce_region(self, region: torch.Tensor, owner: int, async_op: bool = False):
        self._count("reduce_task_grads", region.numel() * region.element_size(), 1)  # as one reduce-scatter slice
        return self.dist.reduce(region, dst=owner, op=self.dist.ReduceOp.SUM, group=self.group, async_op=async_op)

    def sum_grams(self, grams: torch.Tensor) -> torch.Tensor:
        self._count("all_reduce_grams", grams.numel() * grams.element_size(), 2)
        self.dist.all_reduce(grams, op=self.dist.ReduceOp.SUM, group=self.group)
        return grams

    def gather_regions(self, combined: torch.Tensor) -> torch.Tensor:
        self._count("all_gather_combined", self.world_size * combined.numel() * combined.element_size(), 1)
        out = torch.empty(self.world_size * combined.numel(), dtype=combined.dtype, device=combined.device)
        self._all_gather(out, combined.contiguous(), group=self.group)
        return out.view(self.world_size, -1)

    def mean_(self, tensors: list[torch.Tensor], what: str = "all_reduce_heads") -> None:
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        self._count(what, flat.numel() * flat.element_size(), 2)
        self.dist.all_reduce(flat, op=self.dist.ReduceOp.SUM, group=self.group)
        flat.div_(self.world_size)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
