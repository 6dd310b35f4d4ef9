"""What an engine is to the application: one EngineSpec (its facts and its builder) per ``distributed.engine``.

The core holds the step adapters (core/engines/); a spec says how the application starts, builds, shards, launches
and resumes around one of them. Every layer above reads the spec instead of comparing engine names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the specs are read by the config check, which starts without torch: builders import it
    import torch
    from torch import nn

    from ortho_lora_dist.core.engines.base import Engine
    from ortho_lora_dist.core.step import OrthoLoRA
    from ortho_lora_dist.runtime.distributed import DistInfo


@dataclass(frozen=True)
class EngineSettings:
    """What building an engine reads of the run's configuration, typed and passed once."""

    lr: float
    weight_decay: float
    max_grad_norm: float
    schedule: str  # linear, cosine or constant (after warmup)
    warmup_ratio: float
    total_steps: int
    micro_batch: int  # samples per rank per micro-batch (DeepSpeed's train_micro_batch_size_per_gpu)
    bf16: bool
    deepspeed_config: str


Builder = Callable[["EngineSettings", "nn.Module", "OrthoLoRA", "DistInfo"], "Engine"]


@dataclass(frozen=True)
class EngineSpec:
    """One engine: the facts the application asks about it, and how to build it."""

    name: str
    summary: str
    build: Builder
    deepspeed_init: bool = False  # join the process group through deepspeed.init_distributed
    shards_base: bool = False  # the frozen base is sharded with FSDP2 over N > 1 ranks (NF4 stored in model dtype)
    partitioned_state: str = ""  # why the optimizer state resumes only on its own rank count ("" = any count)
    launchers: tuple[str, ...] = ("torchrun", "accelerate")  # ortho-lora launch --launcher values it runs under
    # accelerate config distributed_type values that leave the model to us (FSDP / DEEPSPEED would wrap it)
    accelerate_types: tuple[str, ...] = ("MULTI_GPU", "MULTI_CPU", "NO", "")


def make_scheduler(settings: EngineSettings, optimizer: torch.optim.Optimizer):
    """transformers' schedule ``settings.schedule`` with warmup ``warmup_ratio * total_steps``."""
    from transformers import get_scheduler

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[settings.schedule]
    warmup = int(settings.warmup_ratio * settings.total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=settings.total_steps)


def adamw(params: list[nn.Parameter], settings: EngineSettings) -> torch.optim.AdamW:
    import torch

    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
