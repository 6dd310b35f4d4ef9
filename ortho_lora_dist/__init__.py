"""ortho-lora-dist: exact multi-task LoRA / QLoRA gradients (one backward) under DDP, ZeRO-2 and FSDP2.

Public names are imported lazily, so ``ortho-lora`` starts (and takes its signal handlers) before torch loads.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
_LAZY = {
    "OrthoLoRA": "core.step",
    "StepResult": "core.step",
    "TaskGradCapture": "core.capture",
    "task_mean": "core.losses",
    "combine_weights": "core.projection",
    "gram": "core.gram",
    "joint_weights": "core.projection",
    "project": "core.projection",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
