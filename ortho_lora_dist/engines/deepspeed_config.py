"""A DeepSpeed JSON config read for our step: ZeRO-3 refused, DeepSpeed's accumulation pinned to 1, "auto" filled in."""

from __future__ import annotations

import json
from pathlib import Path

from ortho_lora_dist.runtime.resources import packaged_file


def load_ds_config(
    path: str | Path,
    *,
    micro_batch: int,
    world_size: int,
    grad_clip: float,
    lr: float | None = None,
    bf16: bool = False,
) -> dict:
    """Read a ds_configs/*.json, refuse ZeRO-3, and fill "auto" values from the training config."""
    path = Path(path)
    if not path.exists() and not path.is_absolute():  # a Config built without load_config: the shipped copy
        path = packaged_file(path) or path
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"DeepSpeed config {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"DeepSpeed config {path}, line {e.lineno}: {e.msg}") from None
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ValueError(
            f"{path}: zero_optimization.stage={stage} is not supported; use stage 2 (ds_configs/zero2.json) or FSDP2 "
            "(distributed.engine: fsdp) to shard the base. ZeRO-3 would partition the frozen (possibly 4-bit) base."
        )
    gas = cfg.get("gradient_accumulation_steps", "auto")
    if gas not in ("auto", 1):
        raise ValueError(
            f'{path}: gradient_accumulation_steps={gas}: set it to "auto" (= 1); accumulation happens in the '
            "per-task buffer (train.gradient_accumulation) so that DeepSpeed sees one backward per step"
        )
    auto = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * world_size,
        "gradient_clipping": grad_clip,
    }
    for key, value in auto.items():
        if cfg.get(key, "auto") == "auto":
            cfg[key] = value
    for section, value in (("bf16", bf16), ("fp16", False)):
        if cfg.get(section, {}).get("enabled") == "auto":
            cfg[section]["enabled"] = value
    opt = cfg.get("optimizer", {}).get("params", {})
    if opt.get("lr") == "auto":
        opt["lr"] = lr
    return cfg
