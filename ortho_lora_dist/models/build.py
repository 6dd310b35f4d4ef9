"""Multi-task models around ONE shared PEFT LoRA adapter, by ``model.kind``.

  encoder-classification  models/encoder.py: AutoModel + one head per task (classes or a score)
  causal-lm               models/causal_lm.py: AutoModelForCausalLM, prompt -> answer, loss on the answer tokens
Both expose ``task_losses(batch) -> [T]`` (per-task mean loss), ``task_loss_sums(batch, keep) -> ([T], [T])``
(loss sums and weights, for exact evaluation across batches and ranks), ``task_counts(batch) -> [T]`` (labelled
units per task without a forward: a step's loss denominators) and ``predict(batch)``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ortho_lora_dist.config import Config
from ortho_lora_dist.data.loading import TaskData
from ortho_lora_dist.models.causal_lm import CausalLMMultiTask
from ortho_lora_dist.models.encoder import EncoderMultiTask
from ortho_lora_dist.models.loading import DTYPES, load_tokenizer
from ortho_lora_dist.models.placement import enable_activation_checkpointing, place_model, shard_for_fsdp


def build_model(
    cfg: Config,
    tasks: list[TaskData],
    tokenizer,
    quant_storage: torch.dtype | None = None,
    adapter_dir: str | Path | None = None,
) -> nn.Module:
    """Dispatch on model.kind; ``adapter_dir``: load that saved LoRA adapter instead of adding a new one."""
    builders = {
        "encoder-classification": lambda: EncoderMultiTask(cfg, tasks, tokenizer, adapter_dir),
        "causal-lm": lambda: CausalLMMultiTask(cfg, tasks, tokenizer, quant_storage, adapter_dir),
    }
    return builders[cfg.model.kind]()


def load_run_model(cfg: Config, tasks: list[TaskData], device: torch.device, world: int) -> nn.Module:
    """The model as a run uses it: tokenizer, base (FSDP over NF4: 4-bit storage in the model dtype), LoRA, heads,
    on ``device``, activation checkpointing if asked, in train mode, and the base sharded under FSDP2 with N > 1."""
    fsdp = cfg.distributed.engine == "fsdp"
    storage = DTYPES[cfg.model.dtype] if fsdp and cfg.model.quantization == "nf4" else None
    model = build_model(cfg, tasks, load_tokenizer(cfg.model), storage)
    place_model(model, cfg.model.quantization, device)
    if cfg.train.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    if fsdp and world > 1:
        shard_for_fsdp(model)
    return model
