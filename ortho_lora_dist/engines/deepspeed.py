"""deepspeed: ZeRO-2 (optionally CPU-offloaded) owns the LoRA optimizer; one surrogate backward per step."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ortho_lora_dist.engines.base import EngineSettings, EngineSpec, adamw, make_scheduler
from ortho_lora_dist.engines.deepspeed_config import load_ds_config

if TYPE_CHECKING:
    from torch import nn

    from ortho_lora_dist.core.engines.base import Engine
    from ortho_lora_dist.core.step import OrthoLoRA
    from ortho_lora_dist.runtime.distributed import DistInfo


def build(settings: EngineSettings, model: nn.Module, olr: OrthoLoRA, info: DistInfo) -> Engine:
    """deepspeed.initialize over the LoRA factors (AdamW, the schedule); heads get their own AdamW and schedule."""
    import deepspeed

    from ortho_lora_dist.core.engines.deepspeed_engine import DeepSpeedAdapter

    ds_cfg = load_ds_config(
        settings.deepspeed_config,
        micro_batch=settings.micro_batch,
        world_size=info.world,
        grad_clip=settings.max_grad_norm,
        lr=settings.lr,
        bf16=settings.bf16,
    )
    opt = adamw(olr.lora_params, settings)
    sched = make_scheduler(settings, opt)
    ds_engine, *_ = deepspeed.initialize(model=model, optimizer=opt, model_parameters=olr.lora_params, config=ds_cfg)
    heads = olr.head_params()
    head_opt = adamw(heads, settings) if heads else None
    head_sched = make_scheduler(settings, head_opt) if head_opt else None
    return DeepSpeedAdapter(olr, ds_engine, sched, head_opt, head_sched, settings.max_grad_norm)


SPEC = EngineSpec(
    "deepspeed",
    "DeepSpeed ZeRO-2 owns the LoRA optimizer (partitioned by rank); the combined gradient by a surrogate backward",
    build,
    deepspeed_init=True,
    partitioned_state="ZeRO-2 partitions the optimizer state by rank",
    launchers=("torchrun", "deepspeed", "accelerate"),
    accelerate_types=("MULTI_GPU", "NO", ""),
)
