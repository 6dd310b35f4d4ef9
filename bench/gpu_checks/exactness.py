"""Checks the one-backward capture's per-task LoRA gradients against T backward passes and against plain PEFT."""

from __future__ import annotations

import math
import traceback

import torch

from bench.gpu_checks.common import DTYPE_NAME, build, llama_config, log, per_task_rel, set_checkpointing, task_losses
from bench.gpu_checks.packing import BF16_SHAPES_TOL, packed_vs_padded

FP32_TOL, BF16_TOL = 1e-5, 1e-2


def make_batch(task_ids, L, vocab, device, seed=0, pad=True):
    tids = torch.tensor(task_ids)
    gen = torch.Generator().manual_seed(seed)
    B = len(task_ids)
    ids = torch.randint(1, vocab, (B, L), generator=gen)
    mask = torch.ones(B, L, dtype=torch.long)
    if pad:  # right padding of different lengths
        for b in range(B):
            n = int(torch.randint(L // 2, L + 1, (1,), generator=gen))
            mask[b, n:], ids[b, n:] = 0, 0
    return ids.to(device), mask.to(device), tids.to(device)


def exact_pair(model, T, batch, *, autocast, ckpt, seed=0):
    """Reference (T backwards, no checkpointing) then one-backward capture (checkpointed if ckpt) on one model."""
    from ortho_lora_dist import OrthoLoRA

    ids, mask, tids = batch
    set_checkpointing(model, False)
    ref = OrthoLoRA(model, T, mode="reference")
    torch.manual_seed(seed)  # identical dropout masks on both routes
    ref.backward(task_losses(model, ids, tids, T, mask, autocast))
    set_checkpointing(model, ckpt)
    olr = OrthoLoRA(model, T)
    try:
        olr.set_tasks(tids)
        torch.manual_seed(seed)
        olr.backward(task_losses(model, ids, tids, T, mask, autocast))
        worst, rel, min_norm = per_task_rel(olr, ref, T)
        finite = bool(torch.isfinite(olr.buffer).all() and torch.isfinite(ref.buffer).all())
    finally:
        olr.capture.remove()
        set_checkpointing(model, False)
    return worst, rel, min_norm, finite


def joint_vs_peft(model, T, batch, *, autocast, ckpt, seed=0):
    """Our joint combined gradient (capture, checkpointed if ckpt) vs plain PEFT's .grad of the summed loss."""
    from ortho_lora_dist import OrthoLoRA

    ids, mask, tids = batch
    set_checkpointing(model, ckpt)
    olr = OrthoLoRA(model, T, strategy="joint")
    try:
        olr.set_tasks(tids)
        torch.manual_seed(seed)
        olr.backward(task_losses(model, ids, tids, T, mask, autocast))
        combined = olr.project().combined
    finally:
        olr.capture.remove()
        set_checkpointing(model, False)
    torch.manual_seed(seed)
    task_losses(model, ids, tids, T, mask, autocast).sum().backward()
    num = den = 0.0
    for f in olr.layout.factors:
        g = f.param.grad.float().reshape(-1)
        num += float((combined[f.offset : f.offset + f.numel] - g).double().pow(2).sum())
        den += float(g.double().pow(2).sum())
        f.param.grad = None
    finite = bool(torch.isfinite(combined).all())
    return math.sqrt(num) / max(math.sqrt(den), 1e-300), math.sqrt(den), finite


PLANS = [  # name, precision, task ids of the rows, checkpointing on the capture route, kind
    ("fp32_interleaved_padded", "fp32", [0, 1, 2, 0, 1, 2], False, "pair"),
    ("fp32_reentrant_ckpt_sorted", "fp32", [0, 0, 1, 1, 2, 2], True, "pair"),
    ("fp32_joint_vs_plain_peft", "fp32", [0, 1, 2, 0, 1, 2], True, "joint"),
    ("bf16_autocast_reentrant_ckpt_interleaved", "bf16", [0, 1, 2, 0, 1, 2], True, "pair"),
    ("bf16_autocast_reentrant_ckpt_contiguous", "bf16", [2, 0, 0, 0, 1, 1], True, "pair"),
    ("bf16_autocast_reentrant_ckpt_T8_interleaved", "bf16", list(range(8)) * 2, True, "pair"),
    ("bf16_autocast_joint_vs_plain_peft", "bf16", [0, 1, 2, 0, 1, 2], True, "joint"),
    ("fp32_packed_vs_padded", "fp32", [0, 1, 2, 2, 0, 1, 1, 2], False, "packed"),
    ("bf16_autocast_reentrant_ckpt_packed_vs_padded", "bf16", [0, 1, 2, 2, 0, 1, 1, 2], True, "packed"),
]


def compare(what, model, T, task_ids, batch, vocab, *, autocast, ckpt, tol, seed) -> dict:
    """One check of PLANS ("pair", "packed" or "joint") on a batch from make_batch -> its row's result fields."""
    if what == "joint":
        err, norm, finite = joint_vs_peft(model, T, batch, autocast=autocast, ckpt=ckpt)
        return dict(
            compared="our joint combined gradient vs plain PEFT .grad of the summed loss (no checkpointing)",
            max_rel_err=err,
            per_task_rel_err=None,
            min_ref_norm=norm,
            passed=finite and norm > 0 and err <= tol,
        )
    if what == "pair":
        worst, rel, min_norm, finite = exact_pair(model, T, batch, autocast=autocast, ckpt=ckpt)
        compared = "one-backward capture vs T backward passes (reference, no checkpointing)"
    else:
        ids = batch[0]  # packed_vs_padded draws its own samples, up to as long as these rows
        worst, rel, min_norm, finite = packed_vs_padded(
            model, T, task_ids, ids.shape[1], vocab, ids.device, autocast=autocast, ckpt=ckpt, seed=seed
        )
        compared = "one-backward capture on packed rows (train.packing) vs the same samples padded (no dropout)"
    return dict(
        compared=compared,
        max_rel_err=worst,
        per_task_rel_err=[round(r, 9) for r in rel],
        min_ref_norm=min_norm,
        passed=finite and min_norm > 0 and worst <= tol,
    )


def run_exactness(args, device, quant) -> list[dict]:
    """The checks on a small model (fp32 and bf16 variants); the 7B check is added by the benchmark stage."""
    kind = "tiny" if args.tiny else "small"
    cuda = device.type == "cuda"
    vocab = llama_config(kind).vocab_size
    L = 16 if args.tiny else 64
    models = {}
    out = []
    prec = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32 in the fp32 checks
    try:
        for name, precision, task_ids, ckpt, what in PLANS:
            # CPU: fp32 weights, bf16 autocast
            dtype = torch.bfloat16 if (precision == "bf16" and cuda) else torch.float32
            if precision not in models:
                compute = torch.bfloat16 if precision == "bf16" else torch.float32
                rank = 4 if args.tiny else 8
                models[precision] = build(kind, device, dtype, quant, compute, rank=rank, dropout=0.1)[0]
            model = models[precision]
            T = max(task_ids) + 1
            seed = len(out)
            batch = make_batch(task_ids, L, vocab, device, seed=seed)
            autocast = precision == "bf16"
            tol = BF16_TOL if autocast else FP32_TOL
            if what == "packed" and autocast:
                tol = BF16_SHAPES_TOL
            base = f"nf4 ({precision} compute)" if quant == "nf4" else DTYPE_NAME[dtype]
            row = {
                "name": name,
                "model": kind,
                "base": base,
                "autocast": "bf16" if autocast else None,
                "checkpointing": "reentrant" if ckpt else None,
                "tasks": T,
                "task_ids": task_ids,
                "seq": L,
                "tol": tol,
            }
            try:
                row.update(
                    compare(what, model, T, task_ids, batch, vocab, autocast=autocast, ckpt=ckpt, tol=tol, seed=seed)
                )
            except Exception as e:  # reported, not raised: the other checks still run
                row.update(max_rel_err=None, passed=False, error=f"{type(e).__name__}: {e}")
                log(traceback.format_exc())
            log(
                f"exactness {name}: max rel err {row.get('max_rel_err')} (tol {tol}) "
                f"-> {'pass' if row['passed'] else 'FAIL'}"
            )
            out.append(row)
    finally:
        torch.set_float32_matmul_precision(prec)
        del models
        if cuda:
            torch.cuda.empty_cache()
    return out


def check_bench_model(model, kind: str, quant: str, device, tiny: bool, lora_params) -> dict:
    """The exactness check on the benchmark model itself (T = 3, a padded interleaved batch)."""
    task_ids, L = [0, 1, 2, 0, 1, 2], 16 if tiny else 128
    row = {
        "name": f"{kind}_bf16_autocast_reentrant_ckpt_interleaved",
        "model": kind,
        "base": "nf4 (bf16 compute)" if quant == "nf4" else "fp32",
        "autocast": "bf16",
        "checkpointing": "reentrant",
        "tasks": 3,
        "task_ids": task_ids,
        "seq": L,
        "tol": BF16_TOL,
        "compared": "one-backward capture vs T backward passes (reference, no checkpointing)",
    }
    try:
        worst, rel, min_norm, finite = exact_pair(
            model, 3, make_batch(task_ids, L, model.config.vocab_size, device, seed=99), autocast=True, ckpt=True
        )
        row.update(
            max_rel_err=worst,
            per_task_rel_err=[round(r, 9) for r in rel],
            min_ref_norm=min_norm,
            passed=finite and min_norm > 0 and worst <= BF16_TOL,
        )
    except Exception as e:
        row.update(max_rel_err=None, passed=False, error=f"{type(e).__name__}: {e}")
        log(traceback.format_exc())
    finally:
        set_checkpointing(model, True)
        for p in lora_params:
            p.grad = None
    log(f"exactness {row['name']}: max rel err {row.get('max_rel_err')} -> {'pass' if row['passed'] else 'FAIL'}")
    return row
