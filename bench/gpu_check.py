"""One-command GPU check: CUDA exactness of the one-backward capture, then a 7B-shaped QLoRA benchmark.

    bash scripts/gpu_check.sh [out.json]             # on a GPU machine: at most 8 minutes on one H200
    python bench/gpu_check.py --tiny --out x.json    # the same code end to end on CPU, tiny shapes (seconds)

Prints ONE JSON summary on stdout (progress goes to stderr) and writes it to ``--out``; the file is also
rewritten after every stage, so a run cut short by a timeout still leaves its partial results
(``"complete": false``). Exit status 0 when every exactness check passed and no method failed.

(a) exactness: per-task LoRA gradients of the one-backward capture against T separate backward passes
    (``OrthoLoRA(mode="reference")``) on Llama-shaped models built at random from a config (no download):
    NF4 base through the bitsandbytes CUDA kernels, fp32 and bf16 compute, bf16 autocast, reentrant gradient
    checkpointing (capture checkpointed, reference not), LoRA dropout, padded mixed-task batches covering the
    capture's three row layouts (interleaved -> index, sorted equal -> bmm, contiguous runs -> slice); plus our
    ``joint`` combined gradient against plain PEFT's summed-loss ``.grad``; packed rows (train.packing, sdpa)
    against the same samples padded, fp32 and bf16 autocast + checkpointing; last, one check on the 7B model
    itself. Metric: max over tasks of ||g_t - g_t_ref|| / ||g_t_ref|| (every g_t_ref must be non-zero).
    Tolerances: 1e-5 on fp32 paths (same matmuls, other summation order; TF32 off), 1e-2 under bf16
    autocast (the reference's weight-grad matmul over the whole batch rounds to bf16 differently), 5e-2 for
    packed vs padded under bf16 (the forward runs on other shapes: activations round differently).
(b) benchmark: Llama-2-7B config, random init, NF4 (double quant, bf16 compute), LoRA r=16 on all linear
    layers, dropout 0.05, reentrant checkpointing, bf16 autocast; T tasks x ``--per-task`` sequences per step,
    seq 1024 and 2048, T = 3 and 8. Methods, interleaved round-robin on one model and one AdamW:
      peft_joint       plain PEFT, no capture installed: one backward of the summed loss
      joint            our capture, strategy joint (one backward + per-task buffer)
      ortho            our capture, strategy ortho at factor granularity (the paper's method)
      upgrad_global    our capture, TorchJD UPGrad on the global Gram matrix
      ortho_reference  the paper's way: T backward passes (retain_graph), then ortho
    Reported per method: median step time, tokens/s, peak GPU memory (torch.cuda.max_memory_allocated, reset
    before each step; model, optimizer state and our per-task buffer included) and ratios vs peft_joint.
    Warm-up steps are not timed. Model init time is reported (build, quantize, PEFT).
    Then packed vs padded rows (train.packing, ortho, 8 samples of seq/8..seq tokens, seq = the first of --seqs):
    useful tokens/s of each and packing efficiency ("packing" in the summary; skipped when the budget is spent).
    Time budget: ``--budget`` seconds from start (default 420, inside the shell script's 480 s timeout);
    configurations run from cheapest to dearest, one is skipped when its estimated minimum (warm-up + one
    timed round, extrapolated from the previous one) would overrun, and a running one stops early
    ("status": "truncated") when the next round would. A T-backward step costs about (1 + 3T)/4 joint steps
    under checkpointing, so the reference gets fewer steps (``--ref-warmup``, ``--ref-steps``).

Building a random 7B in NF4 on the GPU, fast: the model is constructed directly on the GPU in bf16
(``torch.device("cuda")`` + default dtype bf16: 13.5 GB, random init by GPU kernels, seconds), then every
decoder nn.Linear is swapped for a ``bnb.nn.Linear4bit`` built on the meta device (no CPU allocation, no
CPU init) whose ``Params4bit`` wraps the bf16 CUDA weight and is quantized in place on the GPU by ``.to``;
the bf16 weight is then freed. No CPU round trip and no checkpoint on disk (``from_pretrained`` with a
BitsAndBytesConfig would need 13.5 GB written and read back). bench/gpu_qlora.py, by contrast, initialises
in fp32 and builds every Linear4bit on the CPU (7B-element CPU init): slower, so its builder is not reused.
"""

from __future__ import annotations

import time

T0 = time.monotonic()  # the budget counts from here (before torch loads)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

BENCH_METHODS = {
    "peft_joint": None,
    "joint": {"strategy": "joint"},
    "ortho": {"strategy": "ortho", "granularity": "factor"},
    "upgrad_global": {"strategy": "upgrad", "granularity": "global"},
    "ortho_reference": {"strategy": "ortho", "granularity": "factor", "mode": "reference"},
}
FP32_TOL, BF16_TOL = 1e-5, 1e-2
# packed vs padded under bf16 autocast: the forward itself runs on other shapes (rows of several samples), so bf16
# activations round differently before any gradient is formed; the exactness proof is the fp32 check (1e-5)
BF16_SHAPES_TOL = 5e-2
DTYPE_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def log(msg: str) -> None:
    print(f"[gpu_check {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- models ------------------------------------------------------------------------------------------------
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
    """Swap every decoder nn.Linear for an NF4 Linear4bit quantized from its weight where it lies (see docstring)."""
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


# -- (a) exactness -------------------------------------------------------------------------------------------
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


def run_exactness(args, device, quant) -> list[dict]:
    """The checks on a small model (fp32 and bf16 variants); the 7B check is added by the benchmark stage."""
    kind = "tiny" if args.tiny else "small"
    cuda = device.type == "cuda"
    cfg = llama_config(kind)
    L = 16 if args.tiny else 64
    plans = [  # name, precision, task ids of the rows, checkpointing on the capture route, kind
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
    models = {}
    out = []
    prec = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32 in the fp32 checks
    try:
        for name, precision, task_ids, ckpt, what in plans:
            dtype = (
                torch.bfloat16 if (precision == "bf16" and cuda) else torch.float32
            )  # CPU: fp32 weights, bf16 autocast
            if precision not in models:
                compute = torch.bfloat16 if precision == "bf16" else torch.float32
                models[precision] = build(kind, device, dtype, quant, compute, rank=4 if args.tiny else 8, dropout=0.1)[
                    0
                ]
            model = models[precision]
            T = max(task_ids) + 1
            batch = make_batch(task_ids, L, cfg.vocab_size, device, seed=len(out))
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
                if what == "pair":
                    worst, rel, min_norm, finite = exact_pair(model, T, batch, autocast=autocast, ckpt=ckpt)
                    row.update(
                        compared="one-backward capture vs T backward passes (reference, no checkpointing)",
                        max_rel_err=worst,
                        per_task_rel_err=[round(r, 9) for r in rel],
                        min_ref_norm=min_norm,
                    )
                    row["passed"] = finite and min_norm > 0 and worst <= tol
                elif what == "packed":
                    worst, rel, min_norm, finite = packed_vs_padded(
                        model, T, task_ids, L, cfg.vocab_size, device, autocast=autocast, ckpt=ckpt, seed=len(out)
                    )
                    row.update(
                        compared="one-backward capture on packed rows (train.packing) vs the same samples padded "
                        "(no dropout)",
                        max_rel_err=worst,
                        per_task_rel_err=[round(r, 9) for r in rel],
                        min_ref_norm=min_norm,
                    )
                    row["passed"] = finite and min_norm > 0 and worst <= tol
                else:
                    err, norm, finite = joint_vs_peft(model, T, batch, autocast=autocast, ckpt=ckpt)
                    row.update(
                        compared="our joint combined gradient vs plain PEFT .grad of the summed loss "
                        "(no checkpointing)",
                        max_rel_err=err,
                        per_task_rel_err=None,
                        min_ref_norm=norm,
                    )
                    row["passed"] = finite and norm > 0 and err <= tol
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


# -- (b) benchmark -------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, model, device, args):
        self.model, self.device, self.args = model, device, args
        self.lora_params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.lora_params, lr=1e-5)
        self.vocab = model.config.vocab_size

    def step(self, method, ids, tids, T) -> tuple[float, int | None, bool]:
        """One optimizer step of ``method``: (seconds, peak bytes or None, skipped for non-finite grads)."""
        from ortho_lora_dist import OrthoLoRA

        spec = BENCH_METHODS[method]
        cuda = self.device.type == "cuda"
        olr = None if spec is None else OrthoLoRA(self.model, T, **spec)  # construction (buffer) not timed
        skipped = False
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            sync(self.device)
            t = time.perf_counter()
            if olr is None:
                task_losses(self.model, ids, tids, T, autocast=True).sum().backward()
            else:
                olr.set_tasks(tids)
                olr.backward(task_losses(self.model, ids, tids, T, autocast=True))
                result = olr.project()
                olr.write_grads(result)
                skipped = result.skipped
            self.opt.step()
            sync(self.device)
            dt = time.perf_counter() - t
            peak = torch.cuda.max_memory_allocated(self.device) if cuda else None
        finally:
            self.opt.zero_grad(set_to_none=True)
            if olr is not None:
                if olr.capture is not None:
                    olr.capture.remove()
                olr.zero_grad()
        return dt, peak, skipped

    def config(self, seq, T, deadline, est_round) -> tuple[dict, float | None]:
        a = self.args
        per_task = a.per_task
        B = T * per_task
        gen = torch.Generator().manual_seed(seq * 100 + T)
        ids = torch.randint(0, self.vocab, (B, seq), generator=gen).to(self.device)
        tids = torch.arange(T, device=self.device).repeat_interleave(per_task)
        plan = {
            m: (a.ref_warmup, a.ref_steps) if m == "ortho_reference" else (a.warmup, a.steps) for m in BENCH_METHODS
        }
        rounds = max(w + s for w, s in plan.values())
        min_rounds = max(w for w, _ in plan.values()) + 1
        row = {"seq": seq, "tasks": T, "batch": B, "tokens_per_step": B * seq, "status": "ok", "methods": {}}
        if est_round is not None and time.monotonic() + est_round * min_rounds > deadline:
            row["status"] = "skipped"  # same keys as a run, with null figures
            row["reason"] = (
                f"time budget: about {est_round * min_rounds:.0f} s needed, {deadline - time.monotonic():.0f} s left"
            )
            rounds = 0
        times = {m: [] for m in plan}
        peaks: dict[str, int] = {}
        skipped = {m: 0 for m in plan}
        errors: dict[str, str] = {}
        last_round = full_round = None  # full: a round in which every method ran (the estimate for the next config)
        for r in range(rounds):
            if r >= min_rounds and last_round is not None and time.monotonic() + last_round > deadline:
                row["status"] = "truncated"
                break
            t_round = time.monotonic()
            for m, (w, s) in plan.items():
                if r >= w + s or m in errors:
                    continue
                try:
                    dt, peak, sk = self.step(m, ids, tids, T)
                except Exception as e:  # e.g. out of memory, missing solver: reported, the others go on
                    errors[m] = f"{type(e).__name__}: {str(e)[:300]}"
                    log(f"{m} seq {seq} T {T}: {errors[m]}")
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                if r >= w:
                    times[m].append(dt)
                    skipped[m] += sk
                if peak is not None:
                    peaks[m] = max(peaks.get(m, 0), peak)
            last_round = time.monotonic() - t_round
            if r < min(w + s for w, s in plan.values()):
                full_round = last_round
            log(f"seq {seq} T {T} round {r + 1}/{rounds}: {last_round:.2f} s")
        for m in plan:
            med = statistics.median(times[m]) if times[m] else None
            row["methods"][m] = {
                "step_s": None if med is None else round(med, 4),
                "tokens_per_s": None if med is None else round(B * seq / med, 1),
                "peak_GiB": round(peaks[m] / 2**30, 3) if m in peaks else None,
                "timed_steps": len(times[m]),
                "nonfinite_skipped_steps": skipped[m],
            }
            if m in errors:
                row["methods"][m]["error"] = errors[m]
        base = row["methods"]["peft_joint"]
        row["vs_peft_joint"] = {}
        for m, res in row["methods"].items():
            ok = res["tokens_per_s"] and base["tokens_per_s"]
            row["vs_peft_joint"][m] = {
                "time": round(res["step_s"] / base["step_s"], 3) if ok else None,
                "tokens_per_s": round(res["tokens_per_s"] / base["tokens_per_s"], 3) if ok else None,
                "peak_memory": round(res["peak_GiB"] / base["peak_GiB"], 3)
                if res["peak_GiB"] and base["peak_GiB"]
                else None,
            }
        if errors:
            row["status"] = "error"
        return row, full_round or last_round  # None when skipped

    def packing(self, seq: int, n: int, deadline: float) -> dict:
        """Useful tokens/s of an ortho step on n samples of spread lengths (seq/8 .. seq), padded (one per row) vs
        packed (train.packing: rows of <= seq tokens), interleaved; packing efficiency = real / all tokens."""
        from ortho_lora_dist import OrthoLoRA
        from ortho_lora_dist.data.packing import efficiency

        T = 3
        batches = spread_batches([i % T for i in range(n)], seq // 8, seq, self.vocab, seq, seq + n)
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
                b = {k: v.to(self.device) for k, v in batches[mode].items()}
                olr = OrthoLoRA(self.model, T)
                try:
                    sync(self.device)
                    t = time.perf_counter()
                    olr.set_tasks(b.get("token_task_ids", b.get("task_ids")))
                    olr.backward(batch_task_losses(self.model, b, T, autocast=True))
                    olr.write_grads(olr.project())
                    self.opt.step()
                    sync(self.device)
                    if r >= 2:
                        times[mode].append(time.perf_counter() - t)
                finally:
                    self.opt.zero_grad(set_to_none=True)
                    olr.capture.remove()
                    olr.zero_grad()
        for mode, ts in times.items():
            row[f"{mode}_step_s"] = round(statistics.median(ts), 4) if ts else None
            row[f"{mode}_useful_tokens_per_s"] = round(useful / statistics.median(ts), 1) if ts else None
        if row["padded_step_s"] and row["packed_step_s"]:
            row["packed/padded"] = round(row["padded_step_s"] / row["packed_step_s"], 3)
        return row


def run_bench(args, device, quant, summary, write) -> None:
    kind = "tiny" if args.tiny else "7b"
    log(f"building the {kind} model ({quant})")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    model, times, n_quant = build(kind, device, dtype, quant, torch.bfloat16, rank=16, dropout=0.05)
    set_checkpointing(model, True)
    cfg = model.config
    bench = Bench(model, device, args)
    summary["benchmark"]["model"] = {
        "config": kind,
        "hidden": cfg.hidden_size,
        "layers": cfg.num_hidden_layers,
        "vocab": cfg.vocab_size,
        "params_total": sum(p.numel() for p in model.parameters()),
        "lora_params": sum(p.numel() for p in bench.lora_params),
        "quantized_linears": n_quant,
        "base": "nf4 (bf16 compute, double quant)" if quant == "nf4" else DTYPE_NAME[dtype],
        "lora": "r=16, alpha=32, dropout 0.05, all linear",
        "checkpointing": "reentrant",
        "autocast": "bf16",
        "memory_after_init_GiB": round(torch.cuda.memory_allocated(device) / 2**30, 3) if cuda else None,
        **times,
    }
    log(f"model ready in {times['init_s']} s")
    # the exactness check on the benchmark model itself (T = 3, a padded interleaved batch)
    task_ids, L = [0, 1, 2, 0, 1, 2], 16 if args.tiny else 128
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
            model, 3, make_batch(task_ids, L, cfg.vocab_size, device, seed=99), autocast=True, ckpt=True
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
        for p in bench.lora_params:
            p.grad = None
    log(f"exactness {row['name']}: max rel err {row.get('max_rel_err')} -> {'pass' if row['passed'] else 'FAIL'}")
    summary["exactness"]["checks"].append(row)
    summary["exactness"]["passed"] = all(c["passed"] for c in summary["exactness"]["checks"])
    write()

    deadline = T0 + args.budget
    configs = sorted(((s, t) for s in args.seqs for t in args.tasks), key=lambda st: (st[1] > 3, st[0], st[1]))
    prev = None  # (round seconds, tokens, T) of the last configuration run
    for seq, T in configs:
        est = None
        if prev is not None:
            r_s, tok, pT = prev
            est = r_s * (T * args.per_task * seq) / tok * math.sqrt(T / pT)
        log(f"benchmark seq {seq} T {T}")
        row, last_round = bench.config(seq, T, deadline, est)
        if last_round is not None:
            prev = (last_round, T * args.per_task * seq, T)
        summary["benchmark"]["results"].append(row)
        write()
    # packed vs padded rows (train.packing), if the budget leaves room: about 10 ortho steps at seq tokens per row
    seq = args.seqs[0]
    if time.monotonic() + (prev[0] if prev else 0) * 3 < deadline:
        log(f"benchmark packing seq {seq}")
        try:
            summary["benchmark"]["packing"] = bench.packing(seq, 8, deadline)
        except Exception as e:
            summary["benchmark"]["packing"] = {"status": "error", "error": f"{type(e).__name__}: {str(e)[:300]}"}
            log(traceback.format_exc())
    else:
        summary["benchmark"]["packing"] = {"status": "skipped", "reason": "time budget"}
    write()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.json", help="JSON summary file (default gpu_check.json)")
    p.add_argument("--tiny", action="store_true", help="tiny Llama, few steps: the same code end to end on CPU")
    p.add_argument(
        "--quant", choices=("auto", "nf4", "none"), default="auto", help="auto: nf4 on CUDA, none (fp32 Linear) on CPU"
    )
    p.add_argument("--seqs", type=int, nargs="+", help="sequence lengths (default 1024 2048; --tiny: 32 64)")
    p.add_argument("--tasks", type=int, nargs="+", default=[3, 8])
    p.add_argument("--per-task", type=int, default=1, help="sequences of each task per step")
    p.add_argument("--warmup", type=int, help="untimed warm-up steps per method (default 2; --tiny 1)")
    p.add_argument("--steps", type=int, help="timed steps per method (default 4; --tiny 2)")
    p.add_argument("--ref-warmup", type=int, default=1, help="warm-up steps of the T-backward reference")
    p.add_argument("--ref-steps", type=int, help="timed steps of the T-backward reference (default 2; --tiny 1)")
    p.add_argument("--budget", type=float, default=420.0, help="seconds from start after which no new round starts")
    p.add_argument("--only", choices=("all", "exactness", "bench"), default="all")
    args = p.parse_args(argv)
    args.seqs = args.seqs or ([32, 64] if args.tiny else [1024, 2048])
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    args.steps = args.steps if args.steps is not None else (2 if args.tiny else 4)
    args.ref_steps = args.ref_steps if args.ref_steps is not None else (1 if args.tiny else 2)

    stdout = sys.stdout
    summary: dict = {
        "complete": False,
        "ok": False,
        "setup": {},
        "exactness": {"passed": False, "checks": []},
        "benchmark": {"model": None, "results": []},
        "elapsed_s": None,
    }

    def write():
        summary["elapsed_s"] = round(time.monotonic() - T0, 1)
        tmp = f"{args.out}.tmp"
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=1)
        os.replace(tmp, args.out)

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 renames (checkpointing), not ours to fix
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the one JSON summary only
        cuda = torch.cuda.is_available()
        device = torch.device("cuda" if cuda else "cpu")
        quant = args.quant if args.quant != "auto" else ("nf4" if cuda else "none")
        setup = summary["setup"]
        setup.update(
            device=torch.cuda.get_device_name(device) if cuda else "cpu",
            tiny=args.tiny,
            quant=quant,
            torch=torch.__version__,
            cuda=torch.version.cuda if cuda else None,
            seqs=args.seqs,
            tasks=args.tasks,
            per_task=args.per_task,
            warmup=args.warmup,
            steps=args.steps,
            ref_warmup=args.ref_warmup,
            ref_steps=args.ref_steps,
            budget_s=args.budget,
            methods=list(BENCH_METHODS),
            tolerances={"fp32": FP32_TOL, "bf16_autocast": BF16_TOL},
        )
        for mod in ("transformers", "peft", "bitsandbytes", "torchjd"):
            try:
                setup[mod] = __import__(mod).__version__
            except Exception as e:  # torchjd has no __version__; a missing one shows here
                from importlib.metadata import PackageNotFoundError, version

                try:
                    setup[mod] = version(mod)
                except PackageNotFoundError:
                    setup[mod] = f"missing ({type(e).__name__})"
        failed = False
        try:
            if not cuda and not args.tiny:
                raise RuntimeError("no CUDA device: the 7B check needs a GPU (use --tiny for the CPU path)")
            if args.only in ("all", "exactness"):
                summary["exactness"]["checks"] = run_exactness(args, device, quant)
                summary["exactness"]["passed"] = all(c["passed"] for c in summary["exactness"]["checks"])
                write()
            if args.only in ("all", "bench"):
                run_bench(args, device, quant, summary, write)
            summary["complete"] = True
        except Exception as e:
            failed = True
            summary["error"] = f"{type(e).__name__}: {e}"
            log(traceback.format_exc())
        bench_ok = all(r["status"] != "error" for r in summary["benchmark"]["results"])
        summary["ok"] = (
            not failed
            and summary["exactness"]["passed"]
            and bench_ok
            and (args.only == "exactness" or bool(summary["benchmark"]["results"]))
        )
        write()
    print(json.dumps(summary, indent=1), file=stdout, flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
