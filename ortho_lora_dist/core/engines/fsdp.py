"""FSDP2 (``fully_shard``) of the frozen base, including a bitsandbytes NF4 base (QLoRA + FSDP).

Decision: LoRA factors and task heads are NOT sharded (``ignored_params``): they stay replicated and
go through TorchEngine like DDP. Memory consequence per rank: P LoRA values + P gradients + 2P AdamW
moments (fp32), i.e. 16 bytes per LoRA parameter (~0.64 GB for Llama-2-7B r=16 on all linear layers,
P = 40M); the base, which is what matters (3.5 GB in NF4, 13.5 GB in bf16), is sharded N ways.
The per-task buffer is reduce-scattered, so its reduced form is T*P/N per rank.

Hard fact (as in Answer.AI's fsdp_qlora): the 4-bit weights are stored packed in a tensor of dtype
``bnb_4bit_quant_storage``; FSDP's all-gather needs one dtype per group, so that storage dtype must
equal the dtype of every other base parameter, and the mixed-precision param dtype must equal it
too, else the packed bytes are cast like numbers and the 4-bit weights are silently garbage.
"""

from __future__ import annotations

import torch
from torch import nn


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (by the model's own ``_no_split_modules``), sharded one by one."""
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def check_quant_storage(model: nn.Module, param_dtype: torch.dtype | None) -> None:
    """Refuse a 4-bit base whose packed storage dtype differs from the other base parameters / FSDP dtype."""
    storage = {p.dtype for n, p in model.named_parameters() if type(p).__name__ == "Params4bit"}
    if not storage:
        return
    others = {p.dtype for p in model.parameters() if type(p).__name__ != "Params4bit" and not p.requires_grad}
    dtypes = storage | others | ({param_dtype} if param_dtype else set())
    if len(dtypes) > 1:
        raise ValueError(
            f"FSDP over a 4-bit base needs one dtype for the packed 4-bit storage and every other frozen parameter "
            f"(found {sorted(map(str, dtypes))}): "
            "load with bnb_4bit_quant_storage=torch.bfloat16 and dtype=torch.bfloat16 "
            "(and mixed precision param dtype bfloat16)"
        )


def shard_base(
    model: nn.Module, keep: list[nn.Parameter], param_dtype: torch.dtype | None = None, mesh=None
) -> nn.Module:
    """fully_shard every transformer block and the root, leaving ``keep`` (LoRA, heads) replicated."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    check_quant_storage(model, param_dtype)
    for m in model.modules():
        # bitsandbytes repacks 4-bit weights in place (weight.data = ...) for its CPU inference kernel; under FSDP
        # that rewrites the all-gathered copy only, and the next all-gather pairs the old bytes with the new
        # quant_state: garbage. Keep the FSDP-safe layout.
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    ignored = set(keep)
    blocks = _blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no transformer block class (_no_split_modules) to shard")
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, ignored_params=ignored)
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=ignored)
    return model
