"""The engines a run can use (``distributed.engine``), one module each holding its EngineSpec.

A new engine is its core step adapter (core/engines/) plus one module here defining ``SPEC``, added to ``ENGINES``.
"""

from __future__ import annotations

from ortho_lora_dist.engines.base import EngineSettings, EngineSpec, make_scheduler
from ortho_lora_dist.engines.ddp import SPEC as DDP
from ortho_lora_dist.engines.deepspeed import SPEC as DEEPSPEED
from ortho_lora_dist.engines.fsdp import SPEC as FSDP

ENGINES: dict[str, EngineSpec] = {e.name: e for e in (DDP, DEEPSPEED, FSDP)}
ENGINE_NAMES: tuple[str, ...] = tuple(ENGINES)


def engine_spec(name: str) -> EngineSpec:
    """The spec of engine ``name`` (a config's value, checked against ENGINE_NAMES)."""
    return ENGINES[name]


__all__ = ["ENGINES", "ENGINE_NAMES", "EngineSettings", "EngineSpec", "engine_spec", "make_scheduler"]
