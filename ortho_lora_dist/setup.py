"""Process group, device and engine set-up from the usual launcher env vars (torchrun, deepspeed, srun)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
from torch import nn

from .comm import Comm, DistComm, LocalComm
from .config import Config
from .engines.base import Engine, TorchEngine, broadcast_trainable_
from .step import OrthoLoRA


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


def init_distributed(cfg: Config) -> DistInfo:
    """Join the process group when launched with WORLD_SIZE > 1 (gloo on CPU, nccl on GPU unless set)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world == 1:
        return DistInfo(0, 1, 0, device, LocalComm())
    import torch.distributed as dist

    backend = cfg.distributed.backend if cfg.distributed.backend != "auto" else ("nccl" if cuda else "gloo")
    # bounded: a rank that dies ends the others' collectives within this time instead of the wall-clock limit
    timeout = datetime.timedelta(seconds=int(os.environ.get("ORTHO_LORA_TIMEOUT_S", "1800")))
    if not dist.is_initialized():
        if cfg.distributed.engine == "deepspeed":
            import deepspeed

            deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, DistComm())


def make_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, total_steps: int):
    from transformers import get_scheduler

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.train.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=int(cfg.train.warmup_ratio * total_steps), num_training_steps=total_steps)


def build_engine(cfg: Config, model: nn.Module, olr: OrthoLoRA, info: DistInfo, total_steps: int, micro_batch: int) -> Engine:
    """The optimizer(s), scheduler(s) and engine adapter for ``distributed.engine``."""
    tc = cfg.train
    heads = olr.head_params()
    if cfg.distributed.engine == "deepspeed":
        import deepspeed

        from .engines.deepspeed_engine import DeepSpeedAdapter, load_ds_config

        ds_cfg = load_ds_config(
            cfg.distributed.deepspeed_config, micro_batch=micro_batch, world_size=info.world,
            grad_clip=tc.max_grad_norm, lr=tc.lr, bf16=cfg.model.dtype == "bfloat16",
        )
        opt = torch.optim.AdamW(olr.lora_params, lr=tc.lr, weight_decay=tc.weight_decay)
        sched = make_scheduler(cfg, opt, total_steps)
        ds_engine, *_ = deepspeed.initialize(model=model, optimizer=opt, model_parameters=olr.lora_params, config=ds_cfg)
        head_opt = torch.optim.AdamW(heads, lr=tc.lr, weight_decay=tc.weight_decay) if heads else None
        head_sched = make_scheduler(cfg, head_opt, total_steps) if head_opt else None
        return DeepSpeedAdapter(olr, ds_engine, sched, head_opt, head_sched, tc.max_grad_norm)
    if info.world > 1:
        broadcast_trainable_(model)
    opt = torch.optim.AdamW(olr.lora_params + heads, lr=tc.lr, weight_decay=tc.weight_decay)
    return TorchEngine(olr, opt, make_scheduler(cfg, opt, total_steps), tc.max_grad_norm)


def shard_for_fsdp(cfg: Config, model: nn.Module) -> None:
    """FSDP2: shard the frozen base; LoRA factors and task heads stay replicated (see engines/fsdp.py)."""
    from .capture import find_lora_factors
    from .engines.fsdp import shard_base

    keep = [lin.weight for _, _, lin in find_lora_factors(model)]
    keep += [p for p in model.parameters() if p.requires_grad and all(p is not k for k in keep)]
    shard_base(model, keep)
