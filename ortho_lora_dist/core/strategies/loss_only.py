"""Loss-only multi-task rules: per-task loss coefficients from the losses alone, no per-task gradients.

A loss-only rule trains on ONE gradient, that of sum_t a_t L_t with coefficients a_t (detached) from the
tasks' losses, so the step captures a single "task" and sends across ranks exactly what joint DDP training
sends (one reduce-scatter + all-gather of the P LoRA values, i.e. one all-reduce), not T of them.

famo          FAMO (Liu et al., NeurIPS 2023). Logits xi (init 0), z = softmax(xi); the model descends
              sum_t c z_t log(L_t - L_t^* + eps) with c = (sum_t z_t / (L_t - L_t^* + eps))^-1 (L^* = 0), whose
              gradient is sum_t a_t grad L_t with a_t = c z_t / (L_t + eps), here times T (so that with equal
              losses and z uniform, a = 1: joint training's sum of losses, whose scale clipping and the
              learning rate were set for). After each step, with
              delta_t = log(L_t(before) + eps) - log(L_t(after) + eps), xi descends grad_xi = J_softmax(xi)^T delta
              with Adam (lr ``w_lr``, weight decay ``gamma``). "After" is the next step's loss (measured at the
              updated parameters on the next batch): the O(1) variant, no extra forward pass; the reference code
              recomputes the same batch after the step instead. So xi_{t+1} uses delta of steps t-1 -> t.
initial_loss  static weights a_t = T * (1 / L_t(0)) / sum_s (1 / L_s(0)) from the first step's losses (mean 1).

Losses are the global per-task means (the caller averages them over ranks), so every rank holds the same
coefficients and state.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ortho_lora_dist.core.options import checked_options, keyword_options
from ortho_lora_dist.core.strategies.base import Strategy, StrategySpec, add_spec

__all__ = ["LOSS_STRATEGIES", "LossBalancer", "LossOnly", "loss_balancer_options", "make_loss_balancer"]

LOSS_STRATEGIES = ("famo", "initial_loss")


class LossBalancer(ABC):
    """Per-task loss coefficients [T] (fp64, CPU) from global per-task losses; stateful across steps."""

    def __init__(self, name: str, num_tasks: int) -> None:
        self.name, self.num_tasks = name, num_tasks

    @abstractmethod
    def coefficients(self, losses: torch.Tensor) -> torch.Tensor:
        """a [T] for one micro-batch whose global per-task losses are ``losses`` [T]."""

    def end_step(self, losses: torch.Tensor) -> None:  # noqa: B027 (a static rule keeps no per-step state)
        """The step's global per-task losses (mean over its micro-batches), measured at this step's parameters."""

    def state_dict(self) -> dict:
        return {"name": self.name}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"loss-balancing state is for {state.get('name')!r}, this run uses {self.name!r}")


def _losses(losses: torch.Tensor, T: int) -> torch.Tensor:
    x = torch.as_tensor(losses).detach().double().cpu().flatten()
    if x.numel() != T:
        raise ValueError(f"expected {T} task losses, got {x.numel()}")
    return x


class FAMO(LossBalancer):
    def __init__(self, num_tasks: int, *, w_lr: float = 0.025, gamma: float = 0.01, eps: float = 1e-8) -> None:
        super().__init__("famo", num_tasks)
        if not (w_lr > 0 and math.isfinite(w_lr)) or not (gamma >= 0 and math.isfinite(gamma)) or not eps > 0:
            raise ValueError(f"need w_lr > 0, gamma >= 0, eps > 0 (got w_lr={w_lr}, gamma={gamma}, eps={eps})")
        self.eps = eps
        self.logits = torch.zeros(num_tasks, dtype=torch.float64, requires_grad=True)
        self.opt = torch.optim.Adam([self.logits], lr=w_lr, weight_decay=gamma)
        self.previous: torch.Tensor | None = None  # the last step's losses

    def weights(self) -> torch.Tensor:
        """z = softmax(xi)."""
        return torch.softmax(self.logits.detach(), -1)

    def coefficients(self, losses: torch.Tensor) -> torch.Tensor:
        d = _losses(losses, self.num_tasks).clamp_min(0) + self.eps
        z = self.weights()
        c = 1.0 / (z / d).sum()
        return self.num_tasks * c * z / d

    def end_step(self, losses: torch.Tensor) -> None:
        now = _losses(losses, self.num_tasks)
        if not bool(torch.isfinite(now).all()):
            return  # a skipped step: no signal, the logits stay
        if self.previous is not None:
            delta = (self.previous.clamp_min(0) + self.eps).log() - (now.clamp_min(0) + self.eps).log()
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(torch.softmax(self.logits, -1), self.logits, grad_outputs=delta)
            self.opt.zero_grad()
            self.logits.grad = grad
            self.opt.step()
        self.previous = now

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "logits": self.logits.detach().clone(),
            "opt": copy.deepcopy(self.opt.state_dict()),
            "previous": None if self.previous is None else self.previous.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            self.logits.copy_(state["logits"])
        self.opt.load_state_dict(state["opt"])
        self.previous = None if state["previous"] is None else torch.as_tensor(state["previous"]).double()


class InitialLoss(LossBalancer):
    def __init__(self, num_tasks: int) -> None:
        super().__init__("initial_loss", num_tasks)
        self.initial: torch.Tensor | None = None

    def coefficients(self, losses: torch.Tensor) -> torch.Tensor:
        if self.initial is None:
            x = _losses(losses, self.num_tasks)
            if not bool(torch.isfinite(x).all() and (x > 0).all()):
                return torch.ones(self.num_tasks, dtype=torch.float64)  # wait for a usable first loss
            self.initial = x
        inv = 1.0 / self.initial
        return self.num_tasks * inv / inv.sum()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "initial": None if self.initial is None else self.initial.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.initial = None if state["initial"] is None else torch.as_tensor(state["initial"]).double()


_BUILDERS = {"famo": FAMO, "initial_loss": InitialLoss}


def loss_balancer_options(name: str) -> dict[str, Any]:
    """The options a loss-only strategy accepts, with their defaults."""
    return keyword_options(_BUILDERS[name].__init__)


def make_loss_balancer(name: str, options: Mapping[str, Any] | None, num_tasks: int) -> LossBalancer:
    options = checked_options(name, options, loss_balancer_options(name))
    try:
        return _BUILDERS[name](num_tasks, **options)
    except (TypeError, ValueError) as e:
        raise ValueError(f"strategy {name!r}: bad options {options}: {e}") from e


class LossOnly(Strategy):
    """A loss-only rule: the step holds ONE gradient, of sum_t a_t L_t (a_t from ``balancer``), taken with weight 1."""

    def __init__(self, name: str, num_blocks: int, balancer: LossBalancer) -> None:
        super().__init__(name, 1, num_blocks)
        self.balancer = balancer

    def _weights(self, grams: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
        return torch.ones(grams.shape[0], 1, dtype=torch.float64, device=grams.device)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "balancer": self.balancer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.balancer.load_state_dict(state["balancer"])


def _spec(name: str) -> StrategySpec:
    def build(T: int, B: int, seed: int, options: dict[str, Any]) -> Strategy:
        return LossOnly(name, B, make_loss_balancer(name, options, T))

    return StrategySpec(name, build, loss_balancer_options(name), stateful=True, loss_only=True, summary=name)


for _name in LOSS_STRATEGIES:
    add_spec(_spec(_name))
