"""ddp: one process, or data parallel with the base and LoRA replicated on every rank (DDP semantics)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ortho_lora_dist.engines.base import EngineSettings, EngineSpec, adamw, make_scheduler

if TYPE_CHECKING:
    from torch import nn

    from ortho_lora_dist.core.engines.base import Engine
    from ortho_lora_dist.core.step import OrthoLoRA
    from ortho_lora_dist.runtime.distributed import DistInfo


def build_torch_engine(settings: EngineSettings, model: nn.Module, olr: OrthoLoRA, info: DistInfo) -> Engine:
    """AdamW over LoRA factors and heads, the schedule, TorchEngine; trainable values broadcast from rank 0."""
    from ortho_lora_dist.core.engines.base import TorchEngine, broadcast_trainable_

    if info.world > 1:
        broadcast_trainable_(model)
    opt = adamw(olr.lora_params + olr.head_params(), settings)
    return TorchEngine(olr, opt, make_scheduler(settings, opt), settings.max_grad_norm)


SPEC = EngineSpec("ddp", "replicated base and LoRA; the combined gradient written to .grad", build_torch_engine)
