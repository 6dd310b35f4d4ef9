"""The engine interface and the plain-torch engine (one process, or DDP-style replicated LoRA)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from ortho_lora_dist.core.step import OrthoLoRA, StepResult


class Engine(Protocol):
    """What the application needs of an engine; checkpoints are split by who holds the state.

    ``state_dict``: the replicated state (optimizers and schedulers every rank holds alike), saved by rank 0.
    ``save_checkpoint(folder)`` / ``load_checkpoint(folder)``: the state each rank holds for itself (ZeRO's
    optimizer partitions), written and read by every rank under ``folder``; nothing for replicated engines.
    """

    olr: OrthoLoRA
    last_grad_norm: float  # ||combined LoRA gradient|| before clipping, at the last step

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The LoRA factors' torch optimizer (its param_groups carry the scheduled learning rate)."""

    def apply(self, result: StepResult) -> None:
        """Hand the combined gradient to the optimizer(s), step them, clear all gradients."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def save_checkpoint(self, folder: Path) -> None: ...

    def load_checkpoint(self, folder: Path) -> None: ...


def clip_(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm of ``params`` to ``max_norm`` (0: no clipping); returns the norm before."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm and max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))
    return float(torch.nn.utils.get_total_norm([p.grad for p in grads]))


class TorchEngine:
    """Replicated LoRA factors: every rank writes the same combined .grad and steps its own optimizer.

    With N ranks this is DDP: the only cross-rank traffic is the per-task reduce-scatter, the Gram
    all-reduce and the all-gather of the combined gradient (in ``OrthoLoRA.write_grads``).
    """

    def __init__(self, olr: OrthoLoRA, optimizer: torch.optim.Optimizer, scheduler=None, max_grad_norm: float = 0.0):
        self.olr, self._optimizer, self.scheduler, self.max_grad_norm = olr, optimizer, scheduler, max_grad_norm
        self.last_grad_norm = 0.0

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._optimizer

    def apply(self, result: StepResult) -> None:
        self.olr.write_grads(result)
        if not result.skipped:
            # the same semantics as DeepSpeed's: LoRA factors clipped as one group, task heads as another;
            # last_grad_norm = ||combined LoRA gradient|| before clipping, on every engine
            self.last_grad_norm = clip_(self.olr.lora_params, self.max_grad_norm)
            clip_(self.olr.head_params(), self.max_grad_norm)
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.olr.zero_grad()

    def state_dict(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict()}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])

    def save_checkpoint(self, folder: Path) -> None:
        """Nothing per rank: every rank holds the same state, which ``state_dict`` gives rank 0 to save."""

    def load_checkpoint(self, folder: Path) -> None:
        """Nothing per rank (see save_checkpoint)."""


def broadcast_trainable_(model: torch.nn.Module, src: int = 0) -> None:
    """Make every rank start from rank ``src``'s trainable parameters (DDP does this at wrap time)."""
    import torch.distributed as dist

    for p in model.parameters():
        if p.requires_grad:
            dist.broadcast(p.data, src)
