"""Times plain PEFT, joint, ortho, upgrad and the T-backward reference on one QLoRA model: tokens/s, peak memory."""

from __future__ import annotations

import math
import statistics
import time
import traceback

import torch

from bench.gpu_checks.common import DTYPE_NAME, T0, build, log, set_checkpointing, sync, task_losses
from bench.gpu_checks.exactness import check_bench_model
from bench.gpu_checks.packing import bench_packing

BENCH_METHODS = {
    "peft_joint": None,
    "joint": {"strategy": "joint"},
    "ortho": {"strategy": "ortho", "granularity": "factor"},
    "upgrad_global": {"strategy": "upgrad", "granularity": "global"},
    "ortho_reference": {"strategy": "ortho", "granularity": "factor", "mode": "reference"},
}


def method_result(times: list[float], peak: int | None, skipped: int, error: str | None, tokens: int) -> dict:
    """One method's figures in a configuration: median step time, tokens/s, peak memory, steps timed/skipped."""
    med = statistics.median(times) if times else None
    res = {
        "step_s": None if med is None else round(med, 4),
        "tokens_per_s": None if med is None else round(tokens / med, 1),
        "peak_GiB": round(peak / 2**30, 3) if peak is not None else None,
        "timed_steps": len(times),
        "nonfinite_skipped_steps": skipped,
    }
    if error is not None:
        res["error"] = error
    return res


def vs_peft_joint(methods: dict) -> dict:
    """Each method's step time, tokens/s and peak memory as ratios to plain PEFT's (None where one is missing)."""
    base = methods["peft_joint"]
    out = {}
    for m, res in methods.items():
        ok = res["tokens_per_s"] and base["tokens_per_s"]
        out[m] = {
            "time": round(res["step_s"] / base["step_s"], 3) if ok else None,
            "tokens_per_s": round(res["tokens_per_s"] / base["tokens_per_s"], 3) if ok else None,
            "peak_memory": round(res["peak_GiB"] / base["peak_GiB"], 3)
            if res["peak_GiB"] and base["peak_GiB"]
            else None,
        }
    return out


class Bench:
    """One model and one AdamW over its LoRA parameters, shared by every method (interleaved round-robin)."""

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
        """Every method on one (seq, T) batch, round-robin -> (its row, seconds of a full round; None if skipped)."""
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
            row["methods"][m] = method_result(times[m], peaks.get(m), skipped[m], errors.get(m), B * seq)
        row["vs_peft_joint"] = vs_peft_joint(row["methods"])
        if errors:
            row["status"] = "error"
        return row, full_round or last_round  # None when skipped


def run_bench(args, device, quant, summary, write) -> None:
    """Build the benchmark model, check it, time every (seq, T) within the budget, then packing; write() as it goes."""
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
    summary["exactness"]["checks"].append(check_bench_model(model, kind, quant, device, args.tiny, bench.lora_params))
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
            summary["benchmark"]["packing"] = bench_packing(bench, seq, 8, deadline)
        except Exception as e:
            summary["benchmark"]["packing"] = {"status": "error", "error": f"{type(e).__name__}: {str(e)[:300]}"}
            log(traceback.format_exc())
    else:
        summary["benchmark"]["packing"] = {"status": "skipped", "reason": "time budget"}
    write()
