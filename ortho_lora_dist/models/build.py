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
from ortho_lora_dist.data.lengths import apply_length_policy
from ortho_lora_dist.data.loading import Records, TaskData
from ortho_lora_dist.engines import engine_spec
from ortho_lora_dist.models.causal_lm import CausalLMMultiTask, check_chat_template
from ortho_lora_dist.models.encoder import EncoderMultiTask
from ortho_lora_dist.models.encoding import LENGTH, TOKENS, CausalEncoding
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


def fit_tasks_to_length(cfg: Config, tasks: list[TaskData], tokenizer, announce: bool) -> None:
    """causal-lm: every task's training split tokenised once (models/encoding.py: with_tokens) and model.truncation
    applied to it (data/lengths.py), before the model loads; a chat task on a tokenizer without a chat template is
    refused first. Encoders truncate their text."""
    if cfg.model.kind != "causal-lm":
        return
    check_chat_template(tasks, tokenizer, cfg.model.name_or_path)
    encoding = CausalEncoding(tokenizer, tasks, cfg.model.max_length)
    for i, task in enumerate(tasks):  # tokenised once here (rank 0 when cached): the loop reads the ids
        train = task.splits.get("train")
        if isinstance(train, Records) and len(train):
            task.splits["train"] = encoding.with_tokens(i, train, announce)
    lengths = lambda i, task: encoding.sample_lengths(i, task.splits["train"])
    apply_length_policy(tasks, lengths, cfg.model.max_length, cfg.model.truncation, announce)


def data_key(cfg: Config, tokenizer) -> dict:
    """What the prepared training data depends on besides the tasks and their sources (data/cache.py's fingerprint):
    for a causal LM the length policy and the tokenizer (its name, size and chat template)."""
    if cfg.model.kind != "causal-lm":
        return {"kind": cfg.model.kind}
    template = getattr(tokenizer, "chat_template", None) or ""
    return {
        "kind": cfg.model.kind,
        "max_length": cfg.model.max_length,
        "truncation": cfg.model.truncation,
        "tokenizer": [cfg.model.name_or_path, type(tokenizer).__name__, len(tokenizer), str(template)],
        "columns": [*TOKENS, LENGTH],  # the training split is stored tokenised (models/encoding.py: with_tokens)
    }


def load_run_model(cfg: Config, tasks: list[TaskData], device: torch.device, world: int, tokenizer=None) -> nn.Module:
    """The model as a run uses it: tokenizer, base (FSDP over NF4: 4-bit storage in the model dtype), LoRA, heads,
    on ``device``, activation checkpointing if asked, in train mode, and the base sharded under FSDP2 with N > 1."""
    shards = engine_spec(cfg.distributed.engine).shards_base
    storage = DTYPES[cfg.model.dtype] if shards and cfg.model.quantization == "nf4" else None
    model = build_model(cfg, tasks, tokenizer or load_tokenizer(cfg.model), storage)
    place_model(model, cfg.model.quantization, device)
    if cfg.train.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    if shards and world > 1:
        shard_for_fsdp(model)
    return model
