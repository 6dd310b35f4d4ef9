"""Storage of the per-task LoRA gradients: N flat regions of T * n values (region r is reduced to /
owned by rank r; inside, each factor is a contiguous [T, numel] block, see layout.py).

Two policies, identical in result:
  step   one [N, T * n] tensor, accumulated over all micro-batches and reduce-scattered at the optimizer
         step (one collective; memory T*P per rank). The default in one process.
  eager  ZeRO-2 style: in every micro-batch's backward, as soon as a factor has written its per-task
         gradients ([T, numel]), they are summed into the rank owning the factor's region
         (dist.reduce) and freed on the other ranks; the owner accumulates across micro-batches.
         Memory per rank: the owned region T*P/N + one factor in flight; traffic T*P per micro-batch.
Eager needs every LoRA factor to run exactly once in every forward (dense transformers do); a factor
that runs twice, or not at all, is reported, never silently mis-reduced.
"""

from __future__ import annotations

import torch

from .comm import Comm, LocalComm
from .layout import Layout, LoraFactor, factor_rows

POLICIES = ("step", "eager")


class TaskGradBuffer:
    """The [T, n] regions of per-task gradients, with the reduction policy of this run."""

    def __init__(self, layout: Layout, num_tasks: int, comm: Comm | None = None, policy: str = "step") -> None:
        if policy not in POLICIES:
            raise ValueError(f"reduce policy must be one of {POLICIES}, got {policy!r}")
        self.layout, self.num_tasks, self.comm, self.policy = layout, num_tasks, comm or LocalComm(), policy
        self.device = layout.factors[0].param.device
        self.shape = (num_tasks * layout.region_size,)
        self.peak_bytes = 0
        self._bytes = 0
        if policy == "step":
            self.full: torch.Tensor | None = self._alloc(layout.num_regions, *self.shape)
        else:
            self.full = None
            self.owned = self._alloc(*self.shape)  # this rank's region, reduced sums
            self.in_flight: dict[int, torch.Tensor] = {}  # factor index -> local [T, numel] gradients
            self.done = [False] * len(layout.factors)

    def _alloc(self, *shape: int) -> torch.Tensor:
        t = torch.zeros(shape, dtype=torch.float32, device=self.device)
        self._bytes += t.nbytes
        self.peak_bytes = max(self.peak_bytes, self._bytes)
        return t

    # -- capture side --------------------------------------------------------------------------------------
    def start_micro_batch(self) -> None:
        """Called at set_tasks: a new forward/backward begins."""
        if self.policy == "eager":
            if any(self.done) and not all(self.done):
                missing = [f.name for f, d in zip(self.layout.factors, self.done) if not d][:3]
                raise RuntimeError(
                    f"reduce policy 'eager': the last backward did not reach LoRA factors {missing}; every factor "
                    "must run in every forward (else use reduce policy 'step')"
                )
            self.done = [False] * len(self.done)

    def slot(self, f: LoraFactor, index: int) -> torch.Tensor:
        """[T, *weight.shape] tensor where factor f accumulates its per-task gradients."""
        if self.policy == "step":
            return factor_rows(self.full[f.region], f, self.num_tasks).view(self.num_tasks, *f.param.shape)
        if self.done[index]:
            raise RuntimeError(f"LoRA factor {f.name} ran twice in one forward: use reduce policy 'step'")
        if f.region == self.comm.rank:  # the owner accumulates in place; dist.reduce adds the others' parts
            return factor_rows(self.owned, f, self.num_tasks).view(self.num_tasks, *f.param.shape)
        if index not in self.in_flight:
            self.in_flight[index] = self._alloc(self.num_tasks, f.numel)
        return self.in_flight[index].view(self.num_tasks, *f.param.shape)

    def factor_done(self, index: int) -> None:
        """Factor ``index`` wrote its gradients for this micro-batch; eager: reduce them to the owner now."""
        if self.policy != "eager":
            return
        f = self.layout.factors[index]
        if f.region == self.comm.rank:
            self.comm.reduce_region(factor_rows(self.owned, f, self.num_tasks), f.region)
        else:
            local = self.in_flight.pop(index)
            self.comm.reduce_region(local, f.region)
            self._bytes -= local.nbytes
        self.done[index] = True

    # -- step side -----------------------------------------------------------------------------------------
    def reduced_region(self) -> torch.Tensor:
        """Global per-task mean over ranks of this rank's region, flat [T * n]."""
        if self.policy == "step":
            return self.comm.reduce_task_grads(self.full)
        if not all(self.done):
            self.start_micro_batch()  # raises with the names of the factors that got no gradient
        return self.owned.div_(self.comm.world_size)  # in place: zero_() clears it before the next step

    def all_local(self) -> torch.Tensor:
        """The whole local [N, T * n] buffer (policy 'step' only: tests and the reference mode)."""
        if self.full is None:
            raise RuntimeError("the local per-task buffer is not kept under reduce policy 'eager'")
        return self.full

    def zero_(self) -> None:
        if self.policy == "step":
            self.full.zero_()
        else:
            self.owned.zero_()
            self.done = [False] * len(self.done)
