"""Any Gram rule acting on the signal rather than the step's noisy Gram (train.gram: debiased or ema).

debiased  the rule sees D: D_st = g_s . g_t (s != t: independent samples) and D_tt = g_t^a . g_t^b, the product of
          the task's two half-gradients (core/noise.py), an unbiased estimate of |G_t|^2 where |g_t|^2 carries
          tr(Sigma_t) / n_t of noise. The capture runs 2T groups (each task's samples split in two halves by row
          parity): twice the per-task buffer and reduction traffic; the combined gradient is sum_t w_t (h_t^a +
          h_t^b) = sum_t w_t g_t, the same update form as the rule on the raw Gram.
ema       the rule sees E_k = beta E_{k-1} + (1 - beta) G_k (E_1 = G_1), per block: the noise of single steps
          averages out, while the update still combines this step's g_t. State: B x T x T (checkpointed); no extra
          traffic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ortho_lora_dist.core.noise import debiased_grams
from ortho_lora_dist.core.strategies.base import Strategy

GRAM_ESTIMATES = ("raw", "debiased", "ema")


class HalfGroups(Strategy):
    """The capture holds 2T half-groups (group 2t + h: task t's half h); the inner T-task rule sees the tasks' Gram,
    raw (the halves summed: what a step sees) or debiased (debiased_grams); weights [B, 2T], each half taking its
    task's w_t, so the update is sum_t w_t (h_t^a + h_t^b) = sum_t w_t g_t."""

    groups_per_task = 2

    def __init__(self, inner: Strategy, debiased: bool) -> None:
        super().__init__(inner.name, 2 * inner.num_tasks, inner.num_blocks)
        self.inner, self.debiased = inner, debiased
        self.tokens: torch.Tensor | None = None

    def observe_counts(self, tokens: torch.Tensor) -> None:
        """This step's labelled units per half-group [2T], summed over ranks (the halves' scale to their means)."""
        self.tokens = torch.as_tensor(tokens).double().cpu()

    def task_grams(self, grams: torch.Tensor) -> torch.Tensor:
        """[B, 2T, 2T] half-group Grams -> [B, T, T] Grams of the task gradients (what a step sees: telemetry)."""
        B, G, _ = grams.shape
        return grams.view(B, G // 2, 2, G // 2, 2).sum((2, 4))

    def _weights(self, grams: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
        if not self.debiased:
            D = self.task_grams(grams)
        elif self.tokens is None:
            raise RuntimeError("debiased Gram: observe_counts(tokens) must be called before each step's weights")
        else:
            D = debiased_grams(grams, self.tokens).to(grams.device)
        w = self.inner.weights(D, [g // 2 for g in order if g % 2 == 0])  # the step's order, over tasks
        return w.repeat_interleave(2, dim=-1)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "debiased": self.debiased, "inner": self.inner.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.inner.load_state_dict(state["inner"])


class Ema(Strategy):
    """The inner rule on E_k = beta E_{k-1} + (1 - beta) G_k of the block Grams (E_1 = G_1)."""

    def __init__(self, inner: Strategy, beta: float) -> None:
        if not 0 <= beta < 1:
            raise ValueError(f"gram_ema_beta must be in [0, 1), got {beta}")
        super().__init__(inner.name, inner.num_tasks, inner.num_blocks)
        self.inner, self.beta = inner, float(beta)
        self.ema: torch.Tensor | None = None

    def _weights(self, grams: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
        self.ema = grams.clone() if self.ema is None else self.beta * self.ema.to(grams) + (1 - self.beta) * grams
        return self.inner.weights(self.ema, order)

    def state_dict(self) -> dict:
        ema = None if self.ema is None else self.ema.cpu().clone()
        return {**super().state_dict(), "gram": "ema", "ema": ema, "inner": self.inner.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if state.get("gram") != "ema":
            raise ValueError("the checkpoint's strategy state has no Gram EMA (train.gram changed)")
        self.ema = None if state["ema"] is None else torch.as_tensor(state["ema"]).double()
        self.inner.load_state_dict(state["inner"])


def with_gram_estimate(inner: Strategy, gram: str, beta: float = 0.9, halves: bool = False) -> Strategy:
    """``inner`` acting on the raw step Gram (raw), the debiased one or an EMA of the raw one; ``halves``: the capture
    holds 2T half-groups (needed by debiased; also for noise telemetry alongside any rule)."""
    if gram not in GRAM_ESTIMATES:
        raise ValueError(f"gram must be one of {GRAM_ESTIMATES}, got {gram!r}")
    if gram == "debiased" and not halves:
        raise ValueError("gram 'debiased' needs the capture of each task's two halves (halves=True)")
    rule = Ema(inner, beta) if gram == "ema" else inner
    return HalfGroups(rule, debiased=gram == "debiased") if halves else rule
