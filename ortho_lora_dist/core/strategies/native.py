"""The toolkit's own Gram rules: joint, ortho (Ortho-LoRA / PCGrad with one order per step) and norm_balance.

joint         w_t = 1                                                   (plain sum)
ortho         Ortho-LoRA / PCGrad with ONE order per step               (projection.combine_weights)
norm_balance  w_t = p_t S / (P ||g_t||), S = sum_k ||g_k||, P = sum_k p_k over tasks with g_k != 0; else 0
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ortho_lora_dist.core.projection import combine_weights, joint_weights
from ortho_lora_dist.core.strategies.base import Strategy, StrategySpec, add_spec


class Joint(Strategy):
    def _weights(self, grams: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
        """w_t = 1."""
        return joint_weights(grams)


class Ortho(Strategy):
    def _weights(self, grams: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
        """PCGrad with one order per step, on the original g_j (projection.py)."""
        return combine_weights(grams, order)


class NormBalance(Strategy):
    def __init__(self, name: str, num_tasks: int, num_blocks: int, *, pref_vector: Any = None) -> None:
        super().__init__(name, num_tasks, num_blocks)
        p = pref_vector_of(pref_vector, num_tasks)
        if p is not None and not bool((p > 0).all()):
            raise ValueError(f"pref_vector must be positive for norm_balance, got {p.tolist()}")
        self.pref = torch.ones(num_tasks, dtype=torch.float64) if p is None else p

    def _weights(self, grams: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
        """w_t = p_t S / (P ||g_t||) on Z = {t: g_t != 0}, S = sum_Z ||g_k||, P = sum_Z p_k; w_t = 0 off Z."""
        norms = torch.diagonal(grams, dim1=-2, dim2=-1).clamp_min(0).sqrt()  # [B, T]
        nonzero = norms > 0
        p = self.pref.to(grams.device).expand_as(norms)
        total = norms.sum(-1, keepdim=True)  # zero norms add nothing
        pref_sum = torch.where(nonzero, p, 0.0).sum(-1, keepdim=True)
        denom = torch.where(nonzero, pref_sum * norms, 1.0)
        return torch.where(nonzero, p * total / denom, 0.0)


def pref_vector_of(value: Any, T: int) -> torch.Tensor | None:
    """A per-task preference vector (list, tuple or tensor of T finite numbers) -> fp64 tensor, or None."""
    if value is None:
        return None
    p = torch.as_tensor(value, dtype=torch.float64).flatten()
    if p.numel() != T or not bool(torch.isfinite(p).all()):
        raise ValueError(f"pref_vector must hold {T} finite numbers (one per task), got {value!r}")
    return p


NATIVE_STRATEGIES = ("ortho", "joint", "norm_balance")
add_spec(StrategySpec("ortho", lambda T, B, seed, o: Ortho("ortho", T, B), {}, summary="Ortho-LoRA / PCGrad"))
add_spec(StrategySpec("joint", lambda T, B, seed, o: Joint("joint", T, B), {}, summary="plain sum"))
add_spec(
    StrategySpec(
        "norm_balance",
        lambda T, B, seed, o: NormBalance("norm_balance", T, B, **o),
        {"pref_vector": None},
        summary="every task's gradient rescaled to the mean norm",
    )
)
