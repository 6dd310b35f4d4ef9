"""Putting a multi-task model and its batches where they run: device, activation checkpointing, FSDP2 sharding."""

from __future__ import annotations

import torch
from torch import nn

from ortho_lora_dist.core.capture import find_lora_factors
from ortho_lora_dist.core.engines.fsdp import shard_base


def to_device(batch: dict, device: torch.device) -> dict:
    """Every tensor of a collated batch on ``device`` (records and other values as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def place_model(model: nn.Module, quantization: str, device: torch.device) -> nn.Module:
    """The whole model to ``device``; a quantized base was created on its device when loaded, so only the heads move."""
    if quantization == "none":
        model.to(device)
    else:
        for head in getattr(model, "heads", None) or []:
            head.to(device)
    return model


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Re-entrant activation checkpointing of the base (PEFT needs input grads for it)."""
    peft = model.peft_model
    base = peft.get_base_model()
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    peft.enable_input_require_grads()


def shard_for_fsdp(model: nn.Module) -> None:
    """FSDP2: shard the frozen base; LoRA factors and task heads stay replicated (see core/engines/fsdp.py).

    The FSDP root is the HF model inside PEFT (``get_base_model()``), not our wrapper: its ``forward`` is what
    training (through PEFT) and ``generate`` both call, so the root's parameters outside the blocks (a Llama's
    embeddings, final norm, lm_head) are gathered on every call. The wrapper's forward is never called."""
    keep = [lin.weight for _, _, lin in find_lora_factors(model)]
    keep += [p for p in model.parameters() if p.requires_grad and all(p is not k for k in keep)]
    shard_base(model.peft_model.get_base_model(), keep)
