"""The causal LM's loss where it is: lm_head on the labelled positions only, and which attention keeps packed
samples apart."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

# Attention implementations whose transformers code keeps packed samples apart from position_ids alone:
# sdpa / eager through masking_utils' packed-sequence mask, flash_attention_2 through its varlen path (one row).
PACKED_ATTENTION = ("sdpa", "eager", "flash_attention_2")


def check_packing(model: nn.Module, model_name: str) -> str:
    """The loaded model's attention implementation if packed rows keep attention inside each sample, else a
    ValueError naming it (and what to set)."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl not in PACKED_ATTENTION:
        raise ValueError(
            f"train.packing: {model_name} runs attention with {impl!r}; packed rows need one of "
            f"{', '.join(PACKED_ATTENTION)} (set model.attn_implementation) or train.packing: false"
        )
    module = sys.modules.get(type(model).__module__)
    if impl != "flash_attention_2" and not hasattr(module, "create_causal_mask"):
        raise ValueError(
            f"train.packing: {type(model).__name__} builds its attention mask without transformers' masking_utils, "
            "which is what reads sample boundaries from position_ids: attention would cross samples; use "
            "train.packing: false (or flash_attention_2)"
        )
    return impl


def labelled_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    pick: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    **extra,
):
    """logits[pick]: [N, V] for the N positions where ``pick`` [B, S] is True, with ``lm_head`` run on those N
    hidden states only (a forward pre-hook gathers them), through the model's own forward (FSDP's and DeepSpeed's
    hooks run as always). A model whose head sees other shapes gets the full logits, then the same gather.
    Packed rows: ``position_ids`` restarting per sample and no ``attention_mask`` (see data/packing.py); ``extra``
    keyword arguments go to the model's forward as they are."""
    head = model.get_output_embeddings()
    gathered = []

    def gather(module, args):
        hidden = args[0]
        if hidden.dim() == 3 and tuple(hidden.shape[:2]) == tuple(pick.shape):
            gathered.append(True)
            return (hidden[pick], *args[1:])
        return None

    handle = head.register_forward_pre_hook(gather) if head is not None else None
    try:
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **extra
        ).logits
    finally:
        if handle is not None:
            handle.remove()
    return logits if gathered else logits[pick]


def labelled_token_losses(
    model: nn.Module, labels: torch.Tensor, input_ids: torch.Tensor, **inputs
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [N], keep [B, S-1]): -log p(labels[:, s+1] | tokens <= s) at the N positions whose next label is not
    -100 (row-major), lm_head on those positions only. ``inputs``: attention_mask, position_ids, ... of the forward."""
    target = labels[:, 1:]
    keep = target != -100
    pick = torch.zeros_like(labels, dtype=torch.bool)
    pick[:, :-1] = keep
    mask, positions = inputs.pop("attention_mask", None), inputs.pop("position_ids", None)
    logits = labelled_logits(model, input_ids, mask, pick, positions, **inputs)
    return F.cross_entropy(logits.float(), target[keep], reduction="none"), keep


def labelled_tasks(labels: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
    """The task of each labelled position (next label != -100), row-major: [N], the order in which lm_head sees
    them (labelled_logits). ``task_ids``: per row [B], or per token [B, S] for packed rows."""
    keep = labels[:, 1:] != -100
    if task_ids.dim() == 2:
        return task_ids.to(keep.device)[:, 1:][keep]
    return task_ids.to(keep.device)[:, None].expand_as(keep)[keep]
