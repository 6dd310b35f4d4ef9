"""Signal and noise of per-task gradients, from the Gram matrix of half-gradients (McCandlish et al. 2018, "An
Empirical Model of Large-Batch Training"). Pure functions of [2T, 2T] matrices: no autograd, no ranks.

Each task's samples of a step are split in two halves a, b by a fixed rule (position parity), and the one-backward
capture runs with 2T groups: h_t^a + h_t^b = g_t, the task's exact gradient (h: the halves' parts of the task's
token-mean loss). With N_t tokens (N_a, N_b per half) and n_a, n_b samples, the halves' own token means are
g^a = h^a N_t / N_a and g^b = h^b N_t / N_b, two independent estimates of the true gradient G_t:
  |G_t|^2      ~ g^a . g^b                            (unbiased: the halves' noise is independent)
  tr(Sigma_t)  ~ |g^a - g^b|^2 / (1/n_a + 1/n_b)      (per-sample gradient noise)
  G_s . G_t    ~ g_s . g_t  (s != t)                  (different tasks' samples are independent)
  B_t = tr(Sigma_t) / |G_t|^2                         (noise scale: the batch beyond which a bigger one stops paying)
  C_st = sum_steps G_s.G_t / sqrt(sum_steps |G_s|^2 sum_steps |G_t|^2)   (debiased conflict: ratios of sums)
"""

from __future__ import annotations

import math

import torch


def step_estimates(halves: torch.Tensor, tokens: torch.Tensor, samples: torch.Tensor) -> dict[str, torch.Tensor]:
    """One step's estimates from the global Gram of the half-gradients ``halves`` [2T, 2T] (group 2t: task t's half
    a, 2t + 1: half b), their labelled-token counts ``tokens`` [2T] and sample counts ``samples`` [2T].

    Returns fp64 tensors: ``raw`` [T, T] = g_s . g_t (what a step sees), ``signal`` [T] ~ |G_t|^2, ``trace`` [T] ~
    tr(Sigma_t), and ``true`` [T, T] ~ G_s . G_t (diagonal: ``signal``)."""
    H = halves.double()
    T = H.shape[0] // 2
    n_tok = tokens.double().view(T, 2)
    n = samples.double().view(T, 2)
    total = n_tok.sum(1)
    scale = total[:, None] / n_tok.clamp_min(1)  # g^h = h^h N_t / N_h
    S = (scale.reshape(-1)[:, None] * scale.reshape(-1)[None, :]) * H  # Gram of the halves' own means
    a, b = torch.arange(0, 2 * T, 2), torch.arange(1, 2 * T, 2)
    raw = H.view(T, 2, T, 2).sum((1, 3))  # (h^a + h^b) . (h^a + h^b): the task gradients' Gram
    signal = S[a, b]
    diff = S[a, a] + S[b, b] - 2 * S[a, b]
    trace = diff / (1 / n[:, 0].clamp_min(1) + 1 / n[:, 1].clamp_min(1))
    true = raw.clone()
    true[range(T), range(T)] = signal
    both = (n > 0).all(1)  # a task with an empty half this step has no estimate
    signal = torch.where(both, signal, torch.full_like(signal, math.nan))
    trace = torch.where(both, trace, torch.full_like(trace, math.nan))
    return {"raw": raw, "signal": signal, "trace": trace, "true": true}


def debiased_grams(halves: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[B, 2T, 2T] Grams of the half-gradients (groups 2t, 2t + 1) and their labelled-token counts [2T] -> [B, T, T]
    estimates of G_s . G_t: off the diagonal g_s . g_t, on it g_t^a . g_t^b (both halves scaled to their own means);
    a task with an empty half keeps its raw |g_t|^2. Projected onto the PSD cone (eigenvalues clamped at 0), since a
    noisy estimate need not be a Gram matrix and the rules' solvers assume one."""
    H = halves.double()
    B, G, _ = H.shape
    T = G // 2
    n_tok = tokens.double().to(H.device).view(T, 2)
    scale = (n_tok.sum(1, keepdim=True) / n_tok.clamp_min(1)).reshape(-1)  # g^h = h^h N_t / N_h
    raw = H.view(B, T, 2, T, 2).sum((2, 4))
    a, b = torch.arange(0, G, 2), torch.arange(1, G, 2)
    signal = H[:, a, b] * scale[a] * scale[b]
    out = raw.clone()
    both = (n_tok > 0).all(1)
    idx = torch.arange(T)
    out[:, idx, idx] = torch.where(both, signal, raw[:, idx, idx])
    lam, vec = torch.linalg.eigh(out)
    return (vec * lam.clamp_min(0)[:, None, :]) @ vec.transpose(-1, -2)


def _conflict(true: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """C_st over the steps ``steps``: sum G_s.G_t / sqrt(sum |G_s|^2 sum |G_t|^2) (NaN where a sum is <= 0)."""
    total = true[steps].sum(0)
    d = torch.diagonal(total)
    denom = (d[:, None] * d[None, :]).clamp_min(0).sqrt()
    return torch.where(denom > 0, total / denom, torch.full_like(total, math.nan))


def summarise(steps: list[dict[str, torch.Tensor]], samples_per_step: torch.Tensor, seed: int = 0) -> dict:
    """Over a window of steps: per task the signal and raw squared-norm shares, the noise scale B_t (ratio of sums)
    beside the step's samples of the task; per pair the raw mean cosine and the debiased conflict C_st with a 95%
    bootstrap CI over steps (2,000 resamples, percentile)."""
    raw = torch.stack([s["raw"] for s in steps])  # [S, T, T]
    true = torch.stack([s["true"] for s in steps])
    signal = torch.stack([s["signal"] for s in steps])
    trace = torch.stack([s["trace"] for s in steps])
    ok = torch.isfinite(signal).all(1) & torch.isfinite(trace).all(1)
    raw, true, signal, trace = raw[ok], true[ok], signal[ok], trace[ok]
    S, T = signal.shape
    if S < 2:
        raise ValueError(f"need at least 2 steps with both halves of every task present, got {S}")
    signal_sum, trace_sum = signal.sum(0), trace.sum(0)
    raw_sq = torch.diagonal(raw, dim1=1, dim2=2).sum(0)
    cos = raw / torch.diagonal(raw, dim1=1, dim2=2).clamp_min(1e-300).sqrt()[:, :, None]
    cos = cos / torch.diagonal(raw, dim1=1, dim2=2).clamp_min(1e-300).sqrt()[:, None, :]
    C = _conflict(true, torch.arange(S))
    gen = torch.Generator().manual_seed(seed)
    boot = torch.stack([_conflict(true, torch.randint(0, S, (S,), generator=gen)) for _ in range(2000)])
    lo, hi = torch.nanquantile(boot, 0.025, dim=0), torch.nanquantile(boot, 0.975, dim=0)
    positive = signal_sum.clamp_min(0)
    return {
        "steps": S,
        "signal_share": (positive / positive.sum().clamp_min(1e-300)).tolist(),
        "raw_share": (raw_sq / raw_sq.sum()).tolist(),
        "noise_scale": torch.where(
            signal_sum > 0, trace_sum / signal_sum, torch.full_like(trace_sum, math.inf)
        ).tolist(),
        "samples_per_step": samples_per_step.double().tolist(),
        "raw_cosine": cos.mean(0).tolist(),
        "conflict": C.tolist(),
        "conflict_ci": [lo.tolist(), hi.tolist()],
        "tasks": T,
    }
