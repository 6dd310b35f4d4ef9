"""The records a run logs (metrics.jsonl, conflicts.jsonl, the trackers): one per log step, one per evaluation."""

from __future__ import annotations

import torch

from ortho_lora_dist.core.diagnostics import leverage, pair_cosines
from ortho_lora_dist.core.noise import step_estimates, summarise
from ortho_lora_dist.core.step import StepResult
from ortho_lora_dist.evaluation.evaluate import EvalResult


def _rounded(names: list[str], values, digits: int = 6) -> dict:
    return dict(zip(names, [round(float(x), digits) for x in values]))


def block_summary(result: StepResult, kinds: list[str]) -> dict:
    """Conflict rate and mean pairwise cosine per block group: lora_A blocks, lora_B blocks, all."""
    out = {}
    groups = {"A": [i for i, k in enumerate(kinds) if k == "A"], "B": [i for i, k in enumerate(kinds) if k == "B"]}
    groups["all"] = list(range(len(kinds)))
    for name, idx in groups.items():
        if idx:
            sel = torch.tensor(idx)
            out[f"conflict_rate/{name}"] = float(result.conflict_rate[sel].mean())
            out[f"cosine/{name}"] = float(result.mean_cosine[sel].mean())
    return out


def step_record(
    step: int,
    names: list[str],
    losses: torch.Tensor,
    result: StepResult,
    *,
    lr: float,
    grad_norm: float,
    kinds: list[str],
    skipped_total: int,
    seconds_per_step: float,
) -> tuple[dict, dict | None]:
    """(the metrics.jsonl record, the conflicts.jsonl record or None) of a log step; ``losses``: mean over ranks."""
    record = {"step": step, "loss": _rounded(names, losses.tolist()), "lr": lr}
    if not result.per_task:  # a loss-only rule: one gradient, its loss coefficients instead of per-task geometry
        record["loss_coefficient"] = _rounded(names, result.loss_coefficients.tolist())
        record.update(
            combined_grad_norm=round(grad_norm, 6),
            skipped_steps=skipped_total,
            seconds_per_step=round(seconds_per_step, 4),
        )
        return record, None
    record.update(
        {
            "grad_norm": _rounded(names, result.task_grad_norms.tolist()),
            "combined_grad_norm": round(grad_norm, 6),
            **{k: round(v, 6) for k, v in block_summary(result, kinds).items()},
            "skipped_steps": skipped_total,
            "seconds_per_step": round(seconds_per_step, 4),
        }
    )
    if not result.skipped:
        lev = leverage(result.grams, result.weights)
        record.update(
            {
                "leverage/change": round(lev["change"], 6),
                "leverage/cos_joint": round(lev["cos_joint"], 6),
                "gain": _rounded(names, lev["gain"]),
                "share": _rounded(names, lev["share"]),
            }
        )
    blocks = {"conflict": [round(x, 4) for x in result.conflict_rate.tolist()]}
    if not result.skipped and len(names) > 1:
        blocks["cos_pairs"] = [[round(x, 3) for x in row] for row in pair_cosines(result.grams).tolist()]
    return record, blocks


def eval_record(step: int, result: EvalResult | None) -> dict | None:
    """``eval`` (metrics), ``eval_loss`` and ``eval_ppl`` (causal LM) per task; None when there is nothing to log."""
    if result is None or not (result.metrics or result.loss):
        return None
    record: dict = {"step": step, "eval": result.metrics}
    for key, values in (("eval_loss", result.loss), ("eval_ppl", result.perplexity)):
        if values:
            record[key] = {k: None if v is None else round(v, 6) for k, v in values.items()}
    return record


ATTENTION = ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "qkv")
MLP = ("mlp", "feed_forward", "ffn", "gate_proj", "up_proj", "down_proj", "intermediate", "experts", "fc1", "fc2")


def block_kind(name: str) -> str:
    """attention, mlp or other, from a block's module name (granularity global: other)."""
    n = name.lower()
    return "attention" if any(k in n for k in ATTENTION) else "mlp" if any(k in n for k in MLP) else "other"


def noise_step(group_grams: torch.Tensor, tokens: torch.Tensor, samples: torch.Tensor, kinds: list[str]) -> dict:
    """One step's signal / noise estimates (core/noise.py) of all blocks and of each block kind."""
    out = {"all": step_estimates(group_grams.sum(0), tokens, samples)}
    for kind in sorted(set(kinds) - {"other"}):
        sel = torch.tensor([i for i, k in enumerate(kinds) if k == kind])
        out[kind] = step_estimates(group_grams[sel].sum(0), tokens, samples)
    return out


def noise_record(step: int, names: list[str], window: list[dict], samples: torch.Tensor, seed: int) -> dict | None:
    """The ``noise`` record of a window of steps: per block kind, each task's signal share and noise scale B_t
    (samples per step beside it), each pair's debiased conflict C_st with its 95% bootstrap CI and raw mean cosine."""
    pairs = [(s, t) for s in range(len(names)) for t in range(s + 1, len(names))]
    out: dict = {}
    for kind in window[0] if window else {}:
        try:
            r = summarise([w[kind] for w in window], samples, seed=seed)
        except ValueError:  # fewer than 2 steps with both halves of every task
            continue
        lo, hi = r["conflict_ci"]
        out[kind] = {
            "signal_share": _rounded(names, r["signal_share"]),
            "noise_scale": _rounded(names, r["noise_scale"], 1),
            "samples_per_step": _rounded(names, r["samples_per_step"], 1),
            "conflict": {f"{names[s]}/{names[t]}": round(r["conflict"][s][t], 4) for s, t in pairs},
            "conflict_ci": {f"{names[s]}/{names[t]}": [round(lo[s][t], 4), round(hi[s][t], 4)] for s, t in pairs},
            "raw_cosine": {f"{names[s]}/{names[t]}": round(r["raw_cosine"][s][t], 4) for s, t in pairs},
        }
    return {"step": step, "noise": out, "noise_window": len(window)} if out else None


class NoiseWindow:
    """train.noise_every: each step's estimates of all blocks and per kind; every ``every`` steps the window's
    ``noise`` record (None on a step that closes no window, or when no step of it had both halves of every task)."""

    def __init__(self, every: int, names: list[str], block_names: tuple[str, ...], seed: int, main: bool) -> None:
        self.every, self.names, self.seed, self.main = every, names, seed, main  # only rank 0 summarises
        self.kinds = [block_kind(n) for n in block_names]
        self.steps: list[tuple[dict, torch.Tensor]] = []

    def add(
        self, step: int, group_grams: torch.Tensor | None, counts: tuple[torch.Tensor, torch.Tensor]
    ) -> dict | None:
        """This step's half-group Grams (None: a skipped step) and (tokens, samples) per group [2T]."""
        if group_grams is not None:
            tokens, samples = counts
            self.steps.append((noise_step(group_grams, tokens, samples, self.kinds), samples))
        if step % self.every:
            return None
        window, self.steps = self.steps, []
        if not window or not self.main:
            return None
        per_step = torch.stack([s for _, s in window]).double().mean(0).view(-1, 2).sum(1)
        return noise_record(step, self.names, [w for w, _ in window], per_step, self.seed)
