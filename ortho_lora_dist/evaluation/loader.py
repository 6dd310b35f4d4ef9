"""What ``ortho-lora eval`` needs and nothing more: the config's tasks, the process group, the model with a trained
adapter loaded. No optimizer, no engine, no OrthoLoRA, no run folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ortho_lora_dist.artifacts.adapter import load_adapter_weights
from ortho_lora_dist.config import Config
from ortho_lora_dist.data.loading import TaskData, load_tasks
from ortho_lora_dist.engines import engine_spec
from ortho_lora_dist.models.build import load_run_model
from ortho_lora_dist.runtime.distributed import DistInfo, init_distributed


@dataclass
class EvalSetup:
    model: nn.Module
    tasks: list[TaskData]
    info: DistInfo


def load_for_eval(cfg: Config, adapter_dir: Path) -> EvalSetup:
    """The model of ``cfg`` (built as training builds it) with the adapter of ``adapter_dir``, in eval mode."""
    tasks = load_tasks(cfg.tasks)  # every data error surfaces here, before any process group or model
    info = init_distributed(cfg.distributed.backend, deepspeed=engine_spec(cfg.distributed.engine).deepspeed_init)
    torch.manual_seed(cfg.train.seed)
    model = load_run_model(cfg, tasks, info.device, info.world)
    load_adapter_weights(model, [t.name for t in tasks], adapter_dir)
    return EvalSetup(model.eval(), tasks, info)
