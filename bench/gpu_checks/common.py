"""Shared by the GPU checks: the run's clock and log, random Llama (NF4) + PEFT models, per-task losses and errors."""

from __future__ import annotations

import contextlib
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from bench.gpu_checks import T0

DTYPE_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def log(msg: str) -> None:
    print(f"[gpu_check {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def llama_config(kind: str):
    from transformers import LlamaConfig

    shapes = {  # vocab, hidden, intermediate, layers, heads, kv heads
        "7b": (32000, 4096, 11008, 32, 32, 32),  # Llama-2-7B
        "small": (2048, 512, 1376, 2, 8, 4),  # exactness on the GPU (GQA as in Llama 3)
        "tiny": (256, 64, 172, 2, 4, 2),  # --tiny: exactness and benchmark on CPU
    }
    v, h, i, n, a, kv = shapes[kind]
    return LlamaConfig(
        vocab_size=v,
        hidden_size=h,
        intermediate_size=i,
        num_hidden_layers=n,
        num_attention_heads=a,
        num_key_value_heads=kv,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        pad_token_id=0,
    )


def quantize_nf4(model: nn.Module, device: torch.device, compute: torch.dtype) -> int:
    """Swap every decoder nn.Linear for an NF4 Linear4bit quantized from its weight where it lies.

    How and why: the docstring of bench/gpu_check.py (building a random 7B in NF4 on the GPU, fast)."""
    import bitsandbytes as bnb

    n = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear and "layers." in f"{name}.{child_name}":
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=compute,
                    compress_statistics=True,
                    quant_type="nf4",
                    device="meta",
                )
                q.weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", module=q
                ).to(device)
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data, requires_grad=False)
                q.train(child.training)
                setattr(module, child_name, q)
                child.weight = None
                n += 1
    return n


def set_checkpointing(model, on: bool) -> None:
    """Reentrant checkpointing of every decoder layer on/off (transformers >= 5 renamed the methods)."""
    base = model.get_base_model()
    if on:
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    elif hasattr(base, "activation_checkpointing_disable"):
        base.activation_checkpointing_disable()
    else:
        base.gradient_checkpointing_disable()


def build(
    kind: str,
    device: torch.device,
    dtype: torch.dtype,
    quant: str,
    compute: torch.dtype,
    *,
    rank: int,
    dropout: float,
    seed: int = 0,
):
    """Random-init Llama from a config on ``device`` in ``dtype`` -> (NF4) -> PEFT LoRA on all linear layers."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    times = {}
    t = time.monotonic()
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(llama_config(kind))
    finally:
        torch.set_default_dtype(prev)
    sync(device)  # no model.to(dtype): it would also round the fp32 RoPE inv_freq buffer to bf16
    times["build_s"] = time.monotonic() - t
    t = time.monotonic()
    n_quant = quantize_nf4(model, device, compute) if quant == "nf4" else 0
    if device.type == "cuda":
        torch.cuda.empty_cache()
    sync(device)
    times["quantize_s"] = time.monotonic() - t
    t = time.monotonic()
    model.config.use_cache = False
    model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    torch.manual_seed(seed + 1)
    lora = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules="all-linear", init_lora_weights=False
    )  # random non-zero B: both factors get gradients from step one
    model = get_peft_model(model, lora)
    for p in model.parameters():
        if p.requires_grad and p.device != device:  # PEFT puts adapters on the base layer's device; make sure
            p.data = p.data.to(device)
    model.train()
    sync(device)
    times["peft_s"] = time.monotonic() - t
    times = {k: round(v, 2) for k, v in times.items()}
    times["init_s"] = round(sum(times.values()), 2)
    return model, times, n_quant


def task_losses(model, ids, task_ids, T, mask=None, autocast=False):
    """Per-task mean next-token loss over real tokens; forward under bf16 autocast when asked."""
    from ortho_lora_dist import task_mean

    ctx = torch.autocast(ids.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    tok = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    tok = tok.view(ids.shape[0], -1)
    w = None if mask is None else mask[:, 1:].float()
    return task_mean(tok, task_ids[:, None].expand_as(tok), T, w)


def per_task_rel(a, b, T):
    """max over tasks of ||a_t - b_t|| / ||b_t|| over all LoRA factors, the per-task values, and min ||b_t||."""
    from ortho_lora_dist.core.layout import factor_rows

    ra, rb = a.buffer[0], b.buffer[0]
    num = torch.zeros(T, dtype=torch.float64, device=ra.device)
    den = torch.zeros_like(num)
    for fa, fb in zip(a.layout.factors, b.layout.factors):
        assert fa.name == fb.name and fa.offset == fb.offset
        x, y = factor_rows(ra, fa, T), factor_rows(rb, fb, T)
        num += (x - y).double().pow(2).sum(1)
        den += y.double().pow(2).sum(1)
    rel = (num.sqrt() / den.sqrt().clamp_min(1e-300)).tolist()
    return max(rel), rel, float(den.sqrt().min())
