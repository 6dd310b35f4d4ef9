"""The process group from the usual launcher env vars (torchrun, deepspeed, srun), and the collectives the
application needs.

The engine core has its own (``core.comm``: per-task reduce, Gram all-reduce, gathers of the combined gradient);
everything else that crosses ranks (votes, log means, evaluation sums, rank 0's answers) goes through this file.
Each function is a no-op in one process.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch

from ortho_lora_dist.core.comm import Comm, DistComm, LocalComm


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    comm: Comm

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def collective_device(self) -> torch.device:
        """Where small tensors that cross ranks live: the GPU under NCCL, else the CPU (gloo)."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def launched_rank() -> int:
    """This process's rank as the launcher (torchrun, deepspeed, srun + torchrun) set it, before any process group."""
    return int(os.environ.get("RANK", "0"))


def init_distributed(backend: str = "auto", deepspeed: bool = False) -> DistInfo:
    """Join the process group when launched with WORLD_SIZE > 1 (gloo on CPU, nccl on GPU unless ``backend``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world == 1:
        return DistInfo(0, 1, 0, device, LocalComm())
    import torch.distributed as dist

    backend = backend if backend != "auto" else ("nccl" if cuda else "gloo")
    # bounded: a rank that dies ends the others' collectives within this time instead of the wall-clock limit
    timeout = datetime.timedelta(seconds=int(os.environ.get("ORTHO_LORA_TIMEOUT_S", "1800")))
    if not dist.is_initialized():
        if deepspeed:
            import deepspeed as ds

            ds.init_distributed(dist_backend=backend, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, DistComm())


def all_ok(info: DistInfo, ok: bool) -> bool:
    """True on every rank iff ``ok`` on every rank (one all-reduce MAX of a flag)."""
    if info.world == 1:
        return ok
    import torch.distributed as dist

    flag = torch.tensor([0.0 if ok else 1.0], device=info.collective_device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() == 0)


def sum_over_ranks(info: DistInfo, x: torch.Tensor) -> torch.Tensor:
    """sum_r x_r, returned on the CPU (x itself is left unchanged)."""
    if info.world == 1:
        return x
    import torch.distributed as dist

    y = x.to(info.collective_device, copy=True)
    dist.all_reduce(y)
    return y.cpu()


def mean_over_ranks(info: DistInfo, x: torch.Tensor) -> torch.Tensor:
    """(1/N) sum_r x_r on the CPU."""
    return x if info.world == 1 else sum_over_ranks(info, x) / info.world


def gather_objects(info: DistInfo, obj: Any) -> list:
    """[obj_0, ..., obj_{N-1}] on every rank (picklable objects)."""
    if info.world == 1:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(info: DistInfo, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if info.world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        import torch.distributed as dist

        dist.barrier()


def leave_process_group() -> None:
    """All ranks leave together: a rank exiting while another still writes outputs can abort in gloo's teardown."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
