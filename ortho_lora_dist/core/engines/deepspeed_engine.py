"""DeepSpeed ZeRO-2 adapter: DeepSpeed's ZeRO optimizer owns (partitions) the LoRA factors' states.

Traps designed around: (1) several ``engine.backward`` calls per optimizer step drop gradients under
ZeRO-1/2 with offload (DeepSpeed PR #7981), and (2) gradient-accumulation-boundary handling under
ZeRO-2 (allenai/open-instruct PR #1498). So DeepSpeed sees exactly ONE backward per optimizer step,
with gradient_accumulation_steps = 1: micro-batches accumulate in our per-task buffer; after the
projection, rank r hands DeepSpeed the surrogate  sum_f <p_f, N * combined_f>  over the factors of its
own region (zero elsewhere), whose gradient, averaged over ranks by ZeRO's reduce-scatter, is exactly
the combined gradient. Task heads stay outside DeepSpeed (replicated, plain AdamW, grads averaged).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ortho_lora_dist.core.engines.base import clip_
from ortho_lora_dist.core.step import OrthoLoRA, StepResult


def surrogate_loss(olr: OrthoLoRA, result: StepResult) -> torch.Tensor:
    """sum_f <p_f, N * combined_f> over the factors of this rank's region (0 * p_f elsewhere, so every factor gets a
    gradient): its gradient, averaged over the N ranks by ZeRO's reduce-scatter, is the combined gradient."""
    N = olr.comm.world_size
    surrogate = torch.zeros((), device=olr.lora_params[0].device)
    for f in olr.layout.factors:
        if f.region == result.region:
            g = result.combined[f.offset : f.offset + f.numel].view_as(f.param) * N
            surrogate = surrogate + (f.param * g.to(f.param.dtype)).sum()
        else:
            surrogate = surrogate + (f.param * 0).sum()
    return surrogate


class DeepSpeedAdapter:
    """Hands the combined LoRA gradient to a DeepSpeed engine built over the LoRA factors."""

    def __init__(
        self,
        olr: OrthoLoRA,
        ds_engine,
        scheduler=None,
        head_optimizer=None,
        head_scheduler=None,
        head_grad_clip: float = 0.0,
    ):
        self.olr, self.engine, self.scheduler = olr, ds_engine, scheduler
        self.head_optimizer, self.head_scheduler, self.head_grad_clip = head_optimizer, head_scheduler, head_grad_clip
        self.last_grad_norm = 0.0

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer DeepSpeed wraps (the one our scheduler sets the learning rate of)."""
        return self.scheduler.optimizer if self.scheduler is not None else self.engine.optimizer

    def apply(self, result: StepResult) -> None:
        olr = self.olr
        heads = olr.head_params()
        olr.comm.mean_([p.grad for p in heads if p.grad is not None])
        if result.skipped:  # every rank skips together (the Grams are global)
            self._step_schedulers()
            olr.zero_grad()
            return
        self.engine.backward(surrogate_loss(olr, result))
        self.engine.step()
        self.last_grad_norm = float(self.engine.get_global_grad_norm() or 0.0)
        if self.head_optimizer is not None and heads:
            clip_(heads, self.head_grad_clip)
            self.head_optimizer.step()
        self._step_schedulers()
        olr.zero_grad()

    def _step_schedulers(self) -> None:
        for s in (self.scheduler, self.head_scheduler):
            if s is not None:
                s.step()

    def state_dict(self) -> dict:
        state = {}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        if self.head_optimizer is not None:
            state["head_optimizer"] = self.head_optimizer.state_dict()
        if self.head_scheduler is not None:
            state["head_scheduler"] = self.head_scheduler.state_dict()
        return state

    def save_checkpoint(self, folder: Path) -> None:
        """Every rank writes its ZeRO partition of the optimizer state under ``folder/deepspeed``."""
        self.engine.save_checkpoint(str(folder / "deepspeed"), tag="state")

    def load_checkpoint(self, folder: Path) -> None:
        """Read what save_checkpoint wrote (the caller verified the folder's checksums: DeepSpeed's loader
        unpickles)."""
        self.engine.load_checkpoint(str(folder / "deepspeed"), tag="state", load_module_strict=False)

    def load_state_dict(self, state: dict) -> None:
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.head_optimizer is not None and "head_optimizer" in state:
            self.head_optimizer.load_state_dict(state["head_optimizer"])
        if self.head_scheduler is not None and "head_scheduler" in state:
            self.head_scheduler.load_state_dict(state["head_scheduler"])
