"""Storage of the per-task LoRA gradients: N flat regions of T * n values (region r is reduced to /
owned by rank r; inside, each factor is a contiguous [T, numel] block, see layout.py).

Two policies, identical in result:
  step   one [N, T * n] tensor, accumulated over all micro-batches and reduce-scattered at the optimizer
         step (one collective; memory T*P per rank). The default in one process.
  eager  ZeRO-2 style: in every micro-batch's backward, factors are grouped into buckets (layout.plan_buckets:
         consecutive in backward order, one owner region, <= bucket_mb and <= 1/16 of a region); as soon as
         every factor of a bucket has written its per-task gradients, the bucket is summed into the rank
         owning its region by one asynchronous dist.reduce, launched in bucket order on every rank. The
         owner accumulates in place in its region across micro-batches; the others write into a bucket
         tensor freed once its reduce has completed: a new bucket first waits for older ones while the
         non-owned buckets alive would exceed 1/8 of a region. All reduces are waited for before the next
         micro-batch and before the projection. Memory per rank: the owned region T*P/N + <= 1/8 of it in
         flight (or one bucket, if a single factor is larger); traffic T*P per micro-batch.
Eager needs every LoRA factor to run exactly once in every forward (dense transformers do); a factor
that runs twice, or not at all, is reported, never silently mis-reduced.

dtype: the buffer holds float32 (default) or bfloat16 values (half the memory; accumulation over tasks'
tokens is fp32 inside each matmul, rounding to bf16 happens once per factor per micro-batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ortho_lora_dist.core.comm import Comm, LocalComm
from ortho_lora_dist.core.layout import Bucket, Layout, factor_rows, plan_buckets

POLICIES = ("step", "eager")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
IN_FLIGHT_PARTS = 8  # non-owned buckets alive at once: <= 1/8 of a region (or one bucket)


def _fp32(region: torch.Tensor) -> torch.Tensor:
    """The region as the projection reads it: itself if fp32, else an fp32 copy (bf16 buffer)."""
    return region if region.dtype == torch.float32 else region.float()


@dataclass(frozen=True)
class ReduceOptions:
    """How the per-task gradients are kept and cross ranks: the policy (step / eager), eager's bucket size, the
    buffer's dtype. Checked once here, passed as one object from OrthoLoRA through the capture to the buffer."""

    policy: str = "step"
    bucket_mb: float = 25.0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"reduce policy must be one of {POLICIES}, got {self.policy!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"buffer dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if not self.bucket_mb > 0:
            raise ValueError(f"bucket_mb must be > 0, got {self.bucket_mb}")


class TaskGradBuffer:
    """The [T, n] regions of per-task gradients, with the reduction policy of this run."""

    def __init__(
        self, layout: Layout, num_tasks: int, comm: Comm | None = None, options: ReduceOptions | None = None
    ) -> None:
        options = options or ReduceOptions()
        policy, bucket_mb = options.policy, options.bucket_mb
        self.layout, self.num_tasks, self.comm, self.policy = layout, num_tasks, comm or LocalComm(), policy
        self.dtype = DTYPES[options.dtype]
        self.device = layout.factors[0].param.device
        self.shape = (num_tasks * layout.region_size,)
        self.peak_bytes = 0
        self._bytes = 0
        self.done = [False] * len(layout.factors)
        if policy == "step":
            self.full: torch.Tensor | None = self._alloc(layout.num_regions, *self.shape)
            self._views: list[torch.Tensor | None] = [
                self._rows(self.full[f.region], i) for i, f in enumerate(layout.factors)
            ]
            return
        self.full = None
        rank = self.comm.rank
        self.owned = self._alloc(*self.shape)  # this rank's region, reduced sums
        self._views = [self._rows(self.owned, i) if f.region == rank else None for i, f in enumerate(layout.factors)]
        self.buckets: list[Bucket] = plan_buckets(
            layout, num_tasks, int(bucket_mb * 2**20) // self.owned.element_size()
        )
        self.bucket_of = [0] * len(layout.factors)
        for k, b in enumerate(self.buckets):
            for i in b.factors:
                self.bucket_of[i] = k
        self.in_flight_cap = self.owned.nbytes // IN_FLIGHT_PARTS
        self._live: dict[int, torch.Tensor] = {}  # bucket -> local gradients of a non-owned bucket being filled
        self._pending: list[tuple[int, object, torch.Tensor | None]] = []  # (bucket, work, non-owned tensor)
        self._reset_buckets()

    def _alloc(self, *shape: int) -> torch.Tensor:
        t = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self._bytes += t.nbytes
        self.peak_bytes = max(self.peak_bytes, self._bytes)
        return t

    def _free(self, t: torch.Tensor) -> None:
        self._bytes -= t.nbytes

    def _rows(self, flat: torch.Tensor, index: int, base: int = 0) -> torch.Tensor:
        """[T, *weight.shape] view of factor ``index`` in ``flat`` (a region, or a bucket starting at column base)."""
        f = self.layout.factors[index]
        return factor_rows(flat, f, self.num_tasks, base).view(self.num_tasks, *f.param.shape)

    def _reset_buckets(self) -> None:
        for k, flat in self._live.items():  # buckets of an interrupted backward
            self._free(flat)
            for i in self.buckets[k].factors:
                self._views[i] = None
        self._live.clear()
        self._left = [len(b.factors) for b in self.buckets]
        self._next = 0  # next bucket to launch: buckets go out in plan order on every rank

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
            self.wait()
            self.done = [False] * len(self.done)
            self._reset_buckets()

    def slot(self, index: int) -> torch.Tensor:
        """[T, *weight.shape] tensor where factor ``index`` accumulates its per-task gradients."""
        if self.policy == "step":
            return self._views[index]
        if self.done[index]:
            name = self.layout.factors[index].name
            raise RuntimeError(f"LoRA factor {name} ran twice in one forward: use reduce policy 'step'")
        view = self._views[index]
        if view is None:  # first factor of a non-owned bucket: allocate the bucket
            view = self._open(self.bucket_of[index])[index]
        return view

    def _open(self, k: int) -> dict[int, torch.Tensor]:
        """Allocate non-owned bucket k (after waiting for older buckets while too many bytes are in flight)."""
        b = self.buckets[k]
        while (
            self._pending and self._bytes - self.owned.nbytes + b.size * self.owned.element_size() > self.in_flight_cap
        ):
            self._wait_one()
        flat = self._alloc(b.size)
        self._live[k] = flat
        views = {i: self._rows(flat, i, b.lo) for i in b.factors}
        for i, v in views.items():
            self._views[i] = v
        return views

    def factor_done(self, index: int) -> None:
        """Factor ``index`` wrote its gradients for this micro-batch; eager: launch every bucket now complete, in
        order."""
        if self.policy != "eager":
            return
        self.done[index] = True
        self._left[self.bucket_of[index]] -= 1
        while self._next < len(self.buckets) and self._left[self._next] == 0:
            self._launch(self._next)
            self._next += 1

    def _launch(self, k: int) -> None:
        """Start the asynchronous reduce of bucket k to its owner: sum over ranks of the bucket's span."""
        b = self.buckets[k]
        if b.region == self.comm.rank:  # the owner reduces in place: dist.reduce adds the others' parts
            self._pending.append((k, self.comm.reduce_region(self.owned[b.lo : b.hi], b.region, async_op=True), None))
            return
        flat = self._live.pop(k)
        for i in b.factors:
            self._views[i] = None
        self._pending.append((k, self.comm.reduce_region(flat, b.region, async_op=True), flat))

    def _wait_one(self) -> None:
        _, work, flat = self._pending.pop(0)
        if work is not None:
            work.wait()
        if flat is not None:
            self._free(flat)

    def wait(self) -> None:
        """Wait for every reduce in flight (eager), freeing the non-owned buckets."""
        while self._pending:
            self._wait_one()

    # -- step side -----------------------------------------------------------------------------------------
    def reduced_region(self) -> torch.Tensor:
        """Global per-task mean over ranks of this rank's region, flat [T * n]."""
        if self.policy == "step":
            return _fp32(self.comm.reduce_task_grads(self.full))
        if not all(self.done):
            self.start_micro_batch()  # raises with the names of the factors that got no gradient
        self.wait()
        return _fp32(self.owned).div_(self.comm.world_size)  # fp32: in place, zero_() clears it before the next step

    def all_local(self) -> torch.Tensor:
        """The whole local [N, T * n] buffer (policy 'step' only: tests and the reference mode)."""
        if self.full is None:
            raise RuntimeError("the local per-task buffer is not kept under reduce policy 'eager'")
        return self.full

    def zero_(self) -> None:
        if self.policy == "step":
            self.full.zero_()
        else:
            self.wait()
            self.owned.zero_()
            self.done = [False] * len(self.done)
            self._reset_buckets()
