"""Checks packed rows (train.packing) against the same samples padded: per-task gradients and useful tokens/s."""

from __future__ import annotations

import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

from bench.gpu_checks.common import per_task_rel, set_checkpointing, sync

# packed vs padded under bf16 autocast: the forward itself runs on other shapes (rows of several samples), so bf16
# activations round differently before any gradient is formed; the exactness proof is the fp32 check (1e-5)
BF16_SHAPES_TOL = 5e-2


def spread_batches(tasks: list[int], lo: int, hi: int, vocab: int, capacity: int, seed: int) -> dict:
    """The same samples (random ids, lengths lo..hi, loss on every next token) two ways: "packed" (train.packing,
    rows of <= capacity tokens, per-token task ids) and "padded" (one right-padded row each, per-sample task ids)."""
    from ortho_lora_dist.data.packing import pack

    gen = torch.Generator().manual_seed(seed)
    lengths = [int(torch.randint(lo, hi + 1, (1,), generator=gen)) for _ in tasks]
    seqs = [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in lengths]
    width = max(lengths)
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in seqs])
    ids = torch.tensor([x + [0] * (width - len(x)) for x in seqs])
    padded = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    return {"packed": pack(seqs, seqs, list(tasks), capacity, 0), "padded": {**padded, "task_ids": torch.tensor(tasks)}}


def batch_task_losses(model, b: dict, T: int, autocast: bool) -> torch.Tensor:
    """Per-task mean next-token loss of a packed or padded batch from spread_batches (full logits)."""
    from ortho_lora_dist import task_mean

    ctx = torch.autocast(b["input_ids"].device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        logits = model(
            input_ids=b["input_ids"],
            attention_mask=b.get("attention_mask"),
            position_ids=b.get("position_ids"),
            use_cache=False,
        ).logits[:, :-1]
    target = b["labels"][:, 1:]
    keep = target != -100
    tok = F.cross_entropy(logits[keep].float(), target[keep], reduction="none")
    task = b["token_task_ids"][:, 1:][keep] if "token_task_ids" in b else b["task_ids"][keep.nonzero()[:, 0]]
    return task_mean(tok, task, T)


def packed_vs_padded(model, T, task_ids, L, vocab, device, *, autocast, ckpt, seed=0):
    """One-backward capture on packed rows (train.packing: several samples of several tasks per row, position ids
    restarting per sample, per-token task ids) vs on the same samples padded; LoRA dropout off (eval mode: the
    masks would be drawn over other shapes). Returns what exact_pair returns."""
    from ortho_lora_dist import OrthoLoRA

    batches = spread_batches(list(task_ids), L // 4, L, vocab, 2 * L, seed)  # rows of up to 2L tokens
    set_checkpointing(model, ckpt)
    model.eval()
    olrs = {}
    try:
        for name, b in batches.items():
            b = {k: v.to(device) for k, v in b.items()}
            olr = OrthoLoRA(model, T)
            olrs[name] = olr
            olr.set_tasks(b.get("token_task_ids", b.get("task_ids")))
            olr.backward(batch_task_losses(model, b, T, autocast))
            olr.capture.remove()
        worst, rel, min_norm = per_task_rel(olrs["packed"], olrs["padded"], T)
        finite = all(bool(torch.isfinite(o.buffer).all()) for o in olrs.values())
    finally:
        for o in olrs.values():
            o.capture.remove()
        model.train()
        set_checkpointing(model, False)
    return worst, rel, min_norm, finite


def bench_packing(bench, seq: int, n: int, deadline: float) -> dict:
    """Useful tokens/s of an ortho step on n samples of spread lengths (seq/8 .. seq), padded (one per row) vs
    packed (train.packing: rows of <= seq tokens), interleaved; packing efficiency = real / all tokens."""
    from ortho_lora_dist import OrthoLoRA
    from ortho_lora_dist.data.packing import efficiency

    T = 3
    batches = spread_batches([i % T for i in range(n)], seq // 8, seq, bench.vocab, seq, seq + n)
    useful = int(batches["packed"]["token_task_ids"].ge(0).sum())
    row = {"seq": seq, "samples": n, "useful_tokens": useful, "status": "ok"}
    row["efficiency"] = {m: round(efficiency(b), 3) for m, b in batches.items()}
    row["shapes"] = {m: list(b["input_ids"].shape) for m, b in batches.items()}
    times: dict[str, list[float]] = {"padded": [], "packed": []}
    for r in range(2 + 3):
        if r >= 3 and time.monotonic() > deadline:
            row["status"] = "truncated"
            break
        for mode in ("padded", "packed") if r % 2 else ("packed", "padded"):
            b = {k: v.to(bench.device) for k, v in batches[mode].items()}
            olr = OrthoLoRA(bench.model, T)
            try:
                sync(bench.device)
                t = time.perf_counter()
                olr.set_tasks(b.get("token_task_ids", b.get("task_ids")))
                olr.backward(batch_task_losses(bench.model, b, T, autocast=True))
                olr.write_grads(olr.project())
                bench.opt.step()
                sync(bench.device)
                if r >= 2:
                    times[mode].append(time.perf_counter() - t)
            finally:
                bench.opt.zero_grad(set_to_none=True)
                olr.capture.remove()
                olr.zero_grad()
    for mode, ts in times.items():
        row[f"{mode}_step_s"] = round(statistics.median(ts), 4) if ts else None
        row[f"{mode}_useful_tokens_per_s"] = round(useful / statistics.median(ts), 1) if ts else None
    if row["padded_step_s"] and row["packed_step_s"]:
        row["packed/padded"] = round(row["padded_step_s"] / row["packed_step_s"], 3)
    return row
