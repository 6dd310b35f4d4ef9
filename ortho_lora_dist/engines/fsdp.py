"""fsdp: FSDP2 fully_shard of the frozen base (bf16 or NF4) over the ranks; LoRA factors and heads replicated."""

from __future__ import annotations

from ortho_lora_dist.engines.base import EngineSpec
from ortho_lora_dist.engines.ddp import build_torch_engine

SPEC = EngineSpec(
    "fsdp",
    "the frozen base sharded (FSDP2), LoRA and heads replicated; the combined gradient written to .grad",
    build_torch_engine,  # the LoRA side is replicated: the same step adapter as ddp
    shards_base=True,
)
