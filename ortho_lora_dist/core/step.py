"""One Ortho-LoRA optimizer step: capture per-task grads -> reduce across ranks -> project -> hand over.

olr = OrthoLoRA(peft_model, num_tasks=3)           # installs the one-backward capture
olr.set_tasks(task_ids)                            # task of every sample of the micro-batch
olr.backward(task_losses)                          # one backward of sum_t w_t L_t (repeat to accumulate)
result = olr.project()                             # reduce per task, Gram -> weights -> combined
olr.write_grads(result); optimizer.step()          # or an engine adapter hands result to its engine
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ortho_lora_dist.core.blocks import block_grams, combine_region
from ortho_lora_dist.core.buffer import ReduceOptions, TaskGradBuffer
from ortho_lora_dist.core.capture import TaskGradCapture, find_lora_factors
from ortho_lora_dist.core.comm import Comm, LocalComm
from ortho_lora_dist.core.diagnostics import gram_telemetry
from ortho_lora_dist.core.layout import Layout, build_layout
from ortho_lora_dist.core.order import TaskOrder
from ortho_lora_dist.core.reference import reference_task_grads
from ortho_lora_dist.core.strategies import STRATEGIES, get_spec, make_strategy
from ortho_lora_dist.core.strategies.signal import HalfGroups, with_gram_estimate

Mode = Literal["one_backward", "reference"]
MODES = ("one_backward", "reference")
__all__ = ["OrthoLoRA", "StepResult", "STRATEGIES", "MODES"]


@dataclass
class StepResult:
    """What one projection produced: this rank's region of the combined gradient and per-block facts."""

    combined: torch.Tensor  # [n] fp32: this rank's region of the combined gradient
    region: int
    order: list[int]
    weights: torch.Tensor  # [B, T] combination weights
    grams: torch.Tensor  # [B, T, T] global Gram matrices
    skipped: bool  # a non-finite gradient in some task: no update (decided identically on every rank)
    conflict_rate: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # [B]
    mean_cosine: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # [B]
    # a loss-only rule: the Grams are of ONE gradient (no per-task ones); its mean loss coefficients a_t [T]
    loss_coefficients: torch.Tensor | None = None
    # a capture of 2T half-groups: their [B, 2T, 2T] Grams (grams / weights above are then the T tasks')
    group_grams: torch.Tensor | None = None

    @property
    def per_task(self) -> bool:
        """Whether grams / weights are per task (False for a loss-only rule: one gradient, no per-task telemetry)."""
        return self.loss_coefficients is None

    @property
    def task_grad_norms(self) -> torch.Tensor:
        """||g_t|| over all LoRA parameters, per task (from the Gram diagonals)."""
        return torch.diagonal(self.grams, dim1=-2, dim2=-1).sum(0).clamp_min(0).sqrt()


def _check_trainable(model: nn.Module, lora: set[int], task_params: Mapping[int, Iterable[nn.Parameter]]) -> None:
    """Refuse shared non-LoRA trainable parameters: their gradient would be the unprojected sum over tasks."""
    declared = {id(p) for ps in task_params.values() for p in ps}
    shared = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in lora | declared]
    if shared:
        more = f" (and {len(shared) - 5} more)" if len(shared) > 5 else ""
        raise ValueError(
            f"trainable non-LoRA parameters shared by all tasks: {', '.join(shared[:5])}{more}. Ortho-LoRA projects "
            "LoRA factors only; freeze them, or pass them in task_params if only one task's samples reach them"
        )


class OrthoLoRA:
    """The Ortho-LoRA gradient path of a PEFT model with ``num_tasks`` tasks sharing one adapter."""

    def __init__(
        self,
        model: nn.Module,
        num_tasks: int,
        *,
        strategy: str = "ortho",
        strategy_options: Mapping[str, object] | None = None,
        granularity: str = "factor",
        seed: int = 0,
        mode: Mode = "one_backward",
        task_params: Mapping[int, Iterable[nn.Parameter]] | None = None,
        comm: Comm | None = None,
        reduce: str = "step",
        bucket_mb: float = 25.0,
        buffer_dtype: str = "float32",
        gram: str = "raw",
        gram_ema_beta: float = 0.9,
        halves: bool = False,
    ) -> None:
        spec = get_spec(strategy)  # ValueError naming the valid ones
        if gram != "raw" and (spec.loss_only or mode != "one_backward"):
            raise ValueError(
                f"gram {gram!r} needs a Gram rule and the one-backward capture, not {strategy!r} / {mode!r}"
            )
        halves = halves or gram == "debiased"  # the num_tasks groups are two halves of each of num_tasks / 2 tasks
        if halves and num_tasks % 2:
            raise ValueError(
                f"gram 'debiased' captures two half-groups per task: num_tasks must be even, got {num_tasks}"
            )
        reduce_options = ReduceOptions(reduce, bucket_mb, buffer_dtype)  # checked once, passed down as one object
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.model, self.num_tasks, self.strategy, self.mode = model, num_tasks, strategy, mode
        self.comm: Comm = comm or LocalComm()
        self.task_params = {int(t): list(ps) for t, ps in (task_params or {}).items()}
        bad = [t for t in self.task_params if not 0 <= t < num_tasks]
        if bad:
            raise ValueError(f"task_params has task ids {bad} outside [0, {num_tasks - 1}]")
        self.order = TaskOrder(num_tasks, seed)
        # a loss-only rule (famo, initial_loss) needs ONE gradient, of sum_t a_t L_t: one "task" in the buffer
        self.loss_only = spec.loss_only
        self.grad_tasks = 1 if self.loss_only else num_tasks
        self._reset_step_losses()
        if mode == "one_backward":
            self.capture: TaskGradCapture | None = TaskGradCapture(
                model, self.grad_tasks, granularity, self.comm, reduce_options
            )
            self.layout: Layout = self.capture.layout
            self.grads = self.capture.grads
        else:
            self.capture = None
            self.layout = build_layout(find_lora_factors(model), granularity, self.comm.world_size)
            self.grads = TaskGradBuffer(self.layout, self.grad_tasks, self.comm, reduce_options)
        self.lora_params = [f.param for f in self.layout.factors]
        try:
            _check_trainable(model, {id(p) for p in self.lora_params}, self.task_params)
            tasks = num_tasks // 2 if halves else num_tasks
            rule = make_strategy(strategy, strategy_options, tasks, self.layout.num_blocks, seed)
            self.combiner = with_gram_estimate(rule, gram, gram_ema_beta, halves)
        except (ValueError, ImportError):
            if self.capture is not None:  # leave the model as it was
                self.capture.remove()
            raise

    @property
    def buffer(self) -> torch.Tensor:
        """The local [N, T * n] per-task gradients (reduce policy 'step'; see layout.py)."""
        return self.grads.all_local()

    # -- capture ---------------------------------------------------------------------------------------
    def set_tasks(self, task_ids: torch.Tensor | Sequence[int], gathered: torch.Tensor | None = None) -> None:
        """Declare the task of every sample of the next micro-batch ([batch]: dim 0 of the model inputs), or of
        every token of packed rows ([batch, seq], -1 for padding); ``gathered`` [N]: the task of each labelled
        position when a LoRA layer (lm_head) runs on those N positions only."""
        if self.capture is not None:
            ids = torch.as_tensor(task_ids)
            if self.loss_only:  # one task (pads stay -1)
                ids = ids.clamp(max=0)
                gathered = None if gathered is None else torch.zeros_like(torch.as_tensor(gathered))
            self.capture.set_tasks(ids, gathered)

    def backward(
        self,
        task_losses: torch.Tensor,
        loss_weights: torch.Tensor | Sequence[float] | None = None,
        backward_fn: Callable[[torch.Tensor], None] | None = None,
        share: torch.Tensor | None = None,
    ) -> None:
        """Accumulate per-task gradients of w_t * L_t (task_losses: [T]) into the buffer; heads get .grad.

        ``share`` [T] (optional): this micro-batch's fraction of the step's labelled units per task, when
        ``task_losses`` are its parts of the step's mean (core/losses.py step_mean_part; they sum to the step's loss
        over micro-batches). Only a loss-only rule reads it: its coefficients come from the micro-batch's own mean
        loss (part / share). Without it, each micro-batch's losses are its own means."""
        if task_losses.shape != (self.num_tasks,):
            raise ValueError(f"task_losses must have shape [{self.num_tasks}], got {tuple(task_losses.shape)}")
        w = torch.ones(self.num_tasks) if loss_weights is None else torch.as_tensor(loss_weights, dtype=torch.float32)
        weighted = task_losses * w.to(task_losses.device, task_losses.dtype)
        if self.loss_only:  # one gradient: of sum_t a_t w_t L_t, a from the global (rank-mean) losses
            a = self._loss_coefficients(task_losses, share)
            weighted = (weighted * a.to(weighted.device, weighted.dtype)).sum()[None]
        if self.mode == "one_backward":
            (backward_fn or torch.Tensor.backward)(weighted.sum())
            return
        heads = [p for t in range(self.num_tasks) for p in self.task_params.get(t, [])]
        grads = reference_task_grads(weighted, self.lora_params + heads)
        self.grads.start_micro_batch()
        offset = 0
        for i, f in enumerate(self.layout.factors):
            self.grads.slot(i).add_(grads[:, offset : offset + f.numel].view(-1, *f.param.shape))
            self.grads.factor_done(i)
            offset += f.numel
        for t in range(self.num_tasks):  # a head's gradient is its own task's row (the only row when loss-only)
            for p in self.task_params.get(t, []):
                g = grads[0 if self.loss_only else t, offset : offset + p.numel()].view_as(p).to(p.dtype)
                p.grad = g.clone() if p.grad is None else p.grad + g
                offset += p.numel()

    def _loss_coefficients(self, task_losses: torch.Tensor, share: torch.Tensor | None) -> torch.Tensor:
        """The loss-only rule's a_t for this micro-batch, from its losses averaged over ranks (the same everywhere)."""
        parts = task_losses.detach().float().clone()
        self.comm.mean_([parts], what="all_reduce_losses")
        parts = parts.double().cpu()
        share = torch.ones_like(parts) if share is None else torch.as_tensor(share).double().cpu()
        means = torch.where(share > 0, parts / share.clamp_min(torch.finfo(torch.float64).tiny), parts)
        a = self.combiner.balancer.coefficients(means)
        self._step_losses += means * share
        self._step_share += share
        self._step_coefficients += a
        self._micro_batches += 1
        return a

    def _reset_step_losses(self) -> None:
        """This step's global losses (weighted by each micro-batch's share) and coefficients, for a loss-only rule."""
        self._step_losses = torch.zeros(self.num_tasks, dtype=torch.float64)
        self._step_share = torch.zeros(self.num_tasks, dtype=torch.float64)
        self._step_coefficients = torch.zeros(self.num_tasks, dtype=torch.float64)
        self._micro_batches = 0

    # -- reduce -> project -------------------------------------------------------------------------------
    def project(self, group_tokens: torch.Tensor | None = None) -> StepResult:
        """Reduce per task across ranks, form global block Grams, derive weights, combine this rank's columns.
        ``group_tokens`` [num_tasks]: the step's labelled units per group, summed over ranks (gram 'debiased')."""
        region, index = self.grads.reduced_region(), self.comm.rank
        grams = self.comm.sum_grams(block_grams(region, index, self.layout, self.grad_tasks))
        order = self.order.next()  # drawn every step, skipped or not, so ranks and resumes stay in step
        skipped = not bool(torch.isfinite(grams).all())
        halves = isinstance(self.combiner, HalfGroups)
        if halves and group_tokens is not None:
            self.combiner.observe_counts(group_tokens)
        if skipped:
            weights = torch.zeros(self.layout.num_blocks, self.num_tasks, dtype=torch.float64)
        else:
            weights = self.combiner.weights(grams, order)
        combined = combine_region(region, index, self.layout, weights)
        group_grams = grams if halves else None
        if halves:  # what a step sees per TASK: the tasks' Gram and weights (telemetry, logs)
            grams, weights = self.combiner.task_grams(grams), weights[:, ::2]
        conflict, cosine = gram_telemetry(grams)
        coefficients = None
        if self.loss_only and self._micro_batches:
            coefficients = self._step_coefficients / self._micro_batches
            self.combiner.balancer.end_step(self._step_losses / self._step_share.clamp_min(1e-300))
            self._reset_step_losses()
        return StepResult(
            combined, index, order, weights, grams, skipped, conflict, cosine, coefficients, group_grams=group_grams
        )

    def head_params(self) -> list[nn.Parameter]:
        return [p for t in sorted(self.task_params) for p in self.task_params[t]]

    # -- hand over (replicated LoRA parameters: single process, DDP) ---------------------------------------
    def write_grads(self, result: StepResult) -> None:
        """Set .grad of every LoRA factor to the combined gradient; average head grads across ranks."""
        regions = self.comm.gather_regions(result.combined)
        for f in self.layout.factors:
            f.param.grad = regions[f.region, f.offset : f.offset + f.numel].view_as(f.param).to(f.param.dtype)
        heads = [p.grad for p in self.head_params() if p.grad is not None]
        self.comm.mean_(heads)
        if result.skipped:
            for p in self.lora_params + self.head_params():
                p.grad = None

    def zero_grad(self) -> None:
        """Clear the per-task buffer and all LoRA / head gradients before the next accumulation."""
        self.grads.zero_()
        for p in self.lora_params + self.head_params():
            p.grad = None

    def state_dict(self) -> dict:
        """Task-order generator and the strategy's state (tensors and Python scalars only)."""
        return {"order": self.order.state_dict(), "strategy": self.combiner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state["order"])
        if "strategy" in state:  # states saved before strategies had state have only "order"
            self.combiner.load_state_dict(state["strategy"])
