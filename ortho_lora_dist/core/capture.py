"""Per-task LoRA gradients from ONE backward pass of the summed loss.

Samples in a batch do not interact inside a LoRA factor, so autograd's weight gradient of a factor,
grad_W = sum over tokens of delta^T u (delta: gradient at the factor's output, u: its input), splits
exactly by task:  grad_W[t] = sum over tokens of samples in task t of delta^T u.  For lora_B, u = A x
and delta carries the LoRA scaling s; for lora_A, u = dropout(x) and delta = B^T (s * dL/dh). So the
paper's per-task gradients come out of one backward plus T small matmuls per factor. The sum is over
tokens, so it splits the same way when a row holds several samples of several tasks (packed sequences,
attention kept inside each sample): ``set_tasks`` then takes the task of every token, [batch, seq]. A layer that
sees only GATHERED positions (a causal LM's ``lm_head`` run on the N labelled positions, models/lm_head.py) gets
[N, features] inputs: ``set_tasks(..., gathered=[N])`` gives the task of each of those rows, and every 2-D factor
input of exactly N rows is read as them.

Each PEFT ``lora_A[adapter]`` / ``lora_B[adapter]`` nn.Linear gets its class swapped to
``_TaskLinear`` (same parameters, same state dict): its forward saves its input as autograd does,
and its backward writes the per-task weight gradients into the shared [T, P] buffer and returns no
weight gradient, so the summed LoRA gradient is never formed (nor reduced). The weight enters the
autograd Function detached, with a zero-size "anchor" leaf standing in as the input that requires
grad: the LoRA parameters never appear in the backward graph of the loss, so no engine hook (DDP,
DeepSpeed ZeRO, FSDP) fires on them during the per-task backward. Whatever runs around the
factor (dropout, scaling, rslora, Linear4bit / Linear8bitLt base layers, checkpointing, autocast) is
PEFT's and torch's own code, untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ortho_lora_dist.core.buffer import ReduceOptions, TaskGradBuffer
from ortho_lora_dist.core.comm import Comm, LocalComm
from ortho_lora_dist.core.layout import Layout, LoraFactor, build_layout

# How the rows of a batch split into tasks, decided once per batch in set_tasks (rows: the samples of a
# [batch, ...] input, or its tokens, flattened, when set_tasks got a [batch, seq] tensor of per-token task ids):
#   ("bmm", T, n)              rows sorted by task, n rows for each of the T tasks: one batched matmul
#   ("slice", t, lo, hi)       task t owns the contiguous rows [lo, hi): a view, no copy
#   ("perm", order, spans)     scattered rows: ONE index_select by ``order`` (rows sorted by task, padding
#                              dropped), shared by every factor, then task t owns the slice spans[t] of it
Groups = list[tuple]


def _task_groups(task_ids: torch.Tensor, num_tasks: int) -> Groups:
    """The grouping of the rows of ``task_ids`` [N] (-1: a padding row, in no task); tensor ops only, so a packed
    micro-batch of 32k tokens costs about a millisecond, not a Python loop over its tokens."""
    n = task_ids.numel()
    if num_tasks > 1 and n % num_tasks == 0:
        sorted_ids = torch.arange(num_tasks, device=task_ids.device).repeat_interleave(n // num_tasks)
        if torch.equal(task_ids, sorted_ids):
            return [("bmm", num_tasks, n // num_tasks)]
    starts = torch.cat([task_ids.new_zeros(1), torch.nonzero(task_ids[1:] != task_ids[:-1]).flatten() + 1])
    run_ids = task_ids[starts]
    real = run_ids >= 0
    if int(real.sum()) == torch.unique(run_ids[real]).numel():  # every task in one contiguous run
        ends = torch.cat([starts[1:], starts.new_tensor([n])])
        return [("slice", t, lo, hi) for t, lo, hi in zip(*(x[real].tolist() for x in (run_ids, starts, ends)))]
    order = torch.argsort(torch.where(task_ids < 0, num_tasks, task_ids), stable=True)
    counts = torch.bincount(task_ids[task_ids >= 0], minlength=num_tasks).tolist()
    ends = torch.tensor(counts).cumsum(0).tolist()
    spans = [(t, e - c, e) for t, (c, e) in enumerate(zip(counts, ends)) if c]
    return [("perm", order[: ends[-1]], spans)]


class CaptureState:
    """Task ids of the current batch and the per-task gradient buffer the factors accumulate into."""

    def __init__(self, num_tasks: int, grads: TaskGradBuffer) -> None:
        self.num_tasks = num_tasks
        self.grads = grads
        self.task_ids: torch.Tensor | None = None
        self.batch = -1  # samples of the current batch (-1: set_tasks not called yet)
        self.shape: tuple[int, ...] = ()  # of task_ids: (batch,) per sample, (batch, seq) per token
        self.tokens = False  # per-token task ids: the factors' inputs are [batch, seq, features]
        self.groups: Groups = []
        self.gathered: tuple[int, Groups] | None = None  # (N, groups) of the gathered rows, if declared
        self.seq = 0  # tokens per row: per-token ids' width, else the first [batch, seq, features] input's seq
        self._flat: dict[int, Groups] = {}  # per-sample ids: groups of the flattened [batch * seq] tokens, by seq
        self._anchors: dict[torch.device, torch.Tensor] = {}

    def anchor(self, device: torch.device) -> torch.Tensor:
        """Zero-size leaf requiring grad: puts every captured factor in the graph without its weight."""
        a = self._anchors.get(device)
        if a is None:
            a = self._anchors[device] = torch.empty(0, device=device, requires_grad=True)
        return a

    def set_tasks(self, task_ids: torch.Tensor, gathered: torch.Tensor | None = None) -> None:
        """Declare the task of every sample (``task_ids`` [batch]) or of every token (``task_ids`` [batch, seq], -1:
        padding, in no task: packed rows) of the next forward/backward; ``gathered`` [N]: the task of each row of a
        gathered [N, features] input (the labelled positions that lm_head alone sees). A [batch * seq, features] input
        is read as the batch's tokens flattened row-major (see _route)."""
        task_ids = torch.as_tensor(task_ids).long()
        if task_ids.dim() > 2 or task_ids.numel() == 0:
            shape = tuple(task_ids.shape)
            raise ValueError(f"task_ids must be [batch] or [batch, seq] and not empty, got shape {shape}")
        self.tokens = task_ids.dim() == 2
        flat = task_ids.reshape(-1)
        real = flat[flat >= 0] if self.tokens else flat
        if real.numel() == 0:
            raise ValueError("task_ids has no token of any task (all -1)")
        lo, hi = int(flat.min()), int(real.max())
        if lo < (-1 if self.tokens else 0) or hi >= self.num_tasks:
            pad = " (or -1 for a padding token)" if self.tokens else ""
            raise ValueError(f"task ids must lie in [0, {self.num_tasks - 1}]{pad}, got range [{lo}, {hi}]")
        self.groups = _task_groups(flat, self.num_tasks)
        self.gathered = None
        if gathered is not None:
            rows = torch.as_tensor(gathered).long().reshape(-1).to(flat.device)
            if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.num_tasks):
                raise ValueError(f"gathered task ids must lie in [0, {self.num_tasks - 1}]")
            self.gathered = (rows.numel(), _task_groups(rows, self.num_tasks) if rows.numel() else [])
        self.grads.start_micro_batch()
        self.task_ids, self.shape = task_ids, tuple(task_ids.shape)
        self.batch = self.shape[0]
        self.seq = self.shape[1] if self.tokens else 0
        self._flat = {}

    def flat_groups(self, rows: int) -> Groups | None:
        """Groups of a [batch * seq, features] input, the batch's tokens flattened row-major (an MoE block's shared
        expert sees them so), or None when ``rows`` is not batch * seq."""
        if not self.seq or rows != self.batch * self.seq:
            return None
        if self.tokens:
            return self.groups
        if self.seq not in self._flat:
            self._flat[self.seq] = _task_groups(self.task_ids.repeat_interleave(self.seq), self.num_tasks)
        return self._flat[self.seq]


def _bad_input(module: _TaskLinear, x: torch.Tensor, state: CaptureState) -> RuntimeError:
    if state.task_ids is None:
        return RuntimeError("call set_tasks(task_ids) before the forward pass of a captured model")
    if x.dim() == 2 and state.gathered is None and "lm_head" in module._olr_name:
        return RuntimeError(
            f"LoRA factor {module._olr_name} got the {x.shape[0]} gathered labelled positions of the batch: pass "
            "their tasks as set_tasks(task_ids, gathered=...) (ortho-lora train and MultiTaskTrainer do)"
        )
    if state.tokens:
        return RuntimeError(
            f"LoRA factor {module._olr_name} got input of shape {tuple(x.shape)}, but the per-token task ids are "
            f"{list(state.shape)}: per-token capture needs inputs shaped [batch, seq, features]"
        )
    return RuntimeError(
        f"LoRA factor {module._olr_name} got input of shape {tuple(x.shape)}, but the batch has "
        f"{state.batch} samples: per-task capture needs inputs shaped [batch, ..., features]"
    )


def _route(x: torch.Tensor, state: CaptureState, name: str) -> tuple[Groups, bool] | None:
    """(groups, per-token rows) of a factor's input ``x``, or None when its shape matches no declared split.

    A 2-D input of batch * seq rows is the batch's tokens flattened row-major (e.g. Qwen2-MoE's shared expert and
    its gate). Not under an ``experts`` module: a routed expert sees a SUBSET of the tokens in routing order, which
    could number batch * seq and still not be that order, so its factors are refused instead of guessed."""
    if state.gathered is not None and x.dim() == 2 and x.shape[0] == state.gathered[0]:
        return state.gathered[1], False  # lm_head on the labelled positions: one row per declared position
    if x.dim() == 2 and ".experts." not in name:
        flat = state.flat_groups(x.shape[0])
        if flat is not None:
            return flat, False
    if state.tokens:
        return (state.groups, True) if x.dim() == 3 and tuple(x.shape[:2]) == state.shape else None
    if x.dim() == 3 and x.shape[0] == state.batch and not state.seq:
        state.seq = x.shape[1]  # the first [batch, seq, features] input of the forward tells seq
    return (state.groups, False) if x.dim() >= 2 and x.shape[0] == state.batch else None


def _accumulate(slot: torch.Tensor, g: torch.Tensor, u: torch.Tensor, groups: Groups, tokens: bool) -> None:
    """slot[t] += g_t^T u_t, g_t / u_t: the rows of task t of the output gradient / the input, flattened to 2-D
    (``tokens``: rows are the tokens of [batch, seq, features] inputs)."""
    d_in, d_out = u.shape[-1], g.shape[-1]
    if tokens:
        g, u = g.reshape(-1, d_out), u.reshape(-1, d_in)
    same = slot.dtype == g.dtype  # else (bf16 buffer): fp32 product, rounded once into the slot
    for group in groups:
        if group[0] == "bmm":  # all T tasks at once: rows sorted by task, n per task
            T = group[1]
            gt, ut = g.reshape(T, -1, d_out).transpose(1, 2), u.reshape(T, -1, d_in)
            slot.baddbmm_(gt, ut) if same else slot.add_(torch.bmm(gt, ut))
            continue
        if group[0] == "perm":  # one gather of the rows in task order, then a slice per task
            _, order, spans = group
            gs, us = g.index_select(0, order), u.index_select(0, order)
            pieces = [(t, gs[lo:hi].reshape(-1, d_out), us[lo:hi].reshape(-1, d_in)) for t, lo, hi in spans]
        else:
            _, t, lo, hi = group
            pieces = [(t, g[lo:hi].reshape(-1, d_out), u[lo:hi].reshape(-1, d_in))]
        for t, g2, u2 in pieces:
            slot[t].addmm_(g2.t(), u2) if same else slot[t].add_(g2.t() @ u2)


class _TaskLinearFn(torch.autograd.Function):
    """y = x W^T; backward: dx = dy W as usual, per-task dW[t] = dy_t^T x_t into the buffer, no summed dW."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, anchor: torch.Tensor, module: _TaskLinear) -> torch.Tensor:
        state = module._olr_state
        route = _route(x, state, module._olr_name)
        if route is None:
            raise _bad_input(module, x, state)
        ctx.x_dtype = x.dtype
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        if x.dtype != dtype:
            x = x.to(dtype)
        if weight.dtype != dtype:
            weight = weight.to(dtype)
        ctx.grads, ctx.index = state.grads, module._olr_index
        ctx.groups, ctx.tokens = route
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, w = ctx.saved_tensors
        if grad_out.dtype != w.dtype:
            grad_out = grad_out.to(w.dtype)
        grads, index = ctx.grads, ctx.index
        _accumulate(grads.slot(index), grad_out, x, ctx.groups, ctx.tokens)
        grads.factor_done(index)
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        grad_x = grad_out @ w
        return (grad_x if grad_x.dtype == ctx.x_dtype else grad_x.to(ctx.x_dtype)), None, None, None


class _TaskLinear(nn.Linear):
    """nn.Linear whose weight gradient is captured per task (class swapped in place, see install)."""

    _olr_state: CaptureState
    _olr_factor: LoraFactor
    _olr_index: int
    _olr_name: str

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not self.weight.requires_grad:
            return F.linear(x, self.weight)
        return _TaskLinearFn.apply(x, self.weight.detach(), self._olr_state.anchor(x.device), self)


def _peft_lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def _check_forward_lora(name: str, layer: nn.Module) -> None:
    """Refuse a LoRA layer whose factors never run a forward of their own: PEFT's ParamWrapper (target_parameters,
    and what ``all-linear`` makes of transformers 5's fused MoE experts and routers) adds B A to the WEIGHT, so the
    capture would see no input and the factors would silently get a zero gradient."""
    if type(layer).__name__ == "ParamWrapper":
        raise ValueError(
            f"LoRA layer {name!r} adapts a parameter (PEFT ParamWrapper: target_parameters, or a fused MoE expert / "
            "router weight that target_modules 'all-linear' reaches); its LoRA enters the weight, not a forward of "
            "lora_A / lora_B, so per-task gradients cannot be captured and it would silently never train. Name the "
            "linear layers instead, e.g. lora.target_modules: [q_proj, k_proj, v_proj, o_proj] on Mixtral / Qwen-MoE"
        )


def find_lora_factors(model: nn.Module) -> list[tuple[str, str, nn.Linear]]:
    """(layer_name, 'A'|'B', linear) for every trainable LoRA factor, refusing what capture can't do exactly."""
    found: list[tuple[str, str, nn.Linear]] = []
    for name, layer in _peft_lora_layers(model):
        _check_forward_lora(name, layer)
        for adapter in layer.active_adapters:
            if adapter not in layer.lora_A:
                if adapter in getattr(layer, "lora_embedding_A", {}):
                    raise ValueError(
                        f"LoRA layer {name!r} adapts an embedding; Ortho-LoRA's one-backward capture supports "
                        "LoRA on linear layers only: remove it from target_modules"
                    )
                continue
            a, b = layer.lora_A[adapter], layer.lora_B[adapter]
            if not a.weight.requires_grad:
                continue
            if adapter in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(adapter):
                variant = type(layer.lora_variant.get(adapter)).__name__ if adapter in layer.lora_variant else "DoRA"
                raise ValueError(
                    f"LoRA layer {name!r} uses the variant {variant}; per-task gradients are exact only for "
                    "vanilla LoRA (use_dora=False and no other variant)"
                )
            for factor, lin in (("A", a), ("B", b)):
                if type(lin) not in (nn.Linear, _TaskLinear):
                    raise ValueError(f"LoRA layer {name!r}: lora_{factor} is a {type(lin).__name__}, not nn.Linear")
                if lin.bias is not None:
                    raise ValueError(f"LoRA layer {name!r}: lora_{factor} has a bias (lora_bias=True is unsupported)")
                found.append((name, factor, lin))
    return found


class TaskGradCapture:
    """Installs per-task gradient capture on every LoRA factor of a PEFT model.

    After ``set_tasks(task_ids)`` (per sample, or per token for packed rows), a forward and ``loss.backward()``
    leave the per-task LoRA gradients (summed over micro-batches) in ``grads`` (a TaskGradBuffer, see buffer.py);
    LoRA ``.grad`` stays None.
    """

    def __init__(
        self,
        model: nn.Module,
        num_tasks: int,
        granularity: str = "factor",
        comm: Comm | None = None,
        reduce: ReduceOptions | None = None,
    ) -> None:
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        comm = comm or LocalComm()
        self.layout: Layout = build_layout(find_lora_factors(model), granularity, comm.world_size)
        self.grads = TaskGradBuffer(self.layout, num_tasks, comm, reduce)
        self.state = CaptureState(num_tasks, self.grads)
        self.install()

    @property
    def num_tasks(self) -> int:
        return self.state.num_tasks

    def set_tasks(self, task_ids: torch.Tensor | Sequence[int], gathered: torch.Tensor | None = None) -> None:
        self.state.set_tasks(torch.as_tensor(task_ids), gathered)

    def install(self) -> None:
        for i, f in enumerate(self.layout.factors):
            f.module.__class__ = _TaskLinear
            f.module._olr_state = self.state
            f.module._olr_factor = f
            f.module._olr_index = i
            f.module._olr_name = f.name

    def remove(self) -> None:
        """Give the factors back their plain nn.Linear class."""
        for f in self.layout.factors:
            f.module.__class__ = nn.Linear
            for attr in ("_olr_state", "_olr_factor", "_olr_index", "_olr_name"):
                f.module.__dict__.pop(attr, None)
