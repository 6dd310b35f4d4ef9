"""Evaluation: every rank predicts its share (same number of forward calls on every rank, as FSDP
needs), rank 0 gathers predictions and computes each task's metric.

Validation loss per task, exact and distributed-safe: every rank sums loss x weight and the weights over its
own records (pads, which only even out the forward calls, get weight 0), the sums are all-reduced, and the
loss is their ratio: for a causal LM the token-weighted mean over the answer tokens (as in training, EOS
included), with perplexity exp(loss); for an encoder the mean over samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ortho_lora_dist.data.loading import TaskData
from ortho_lora_dist.evaluation.metrics import compute
from ortho_lora_dist.models.causal_lm import CausalLMMultiTask
from ortho_lora_dist.models.generation import answer
from ortho_lora_dist.models.placement import to_device
from ortho_lora_dist.runtime.distributed import DistInfo, gather_objects, sum_over_ranks
from ortho_lora_dist.runtime.progress import progress


@dataclass
class EvalResult:
    """``metrics``: {task: metric, "average": mean}; ``loss``: {task: validation loss}; ``perplexity``: causal LM only.

    Rank 0 holds the metrics; every rank holds the (all-reduced) losses.
    """

    metrics: dict = field(default_factory=dict)
    loss: dict = field(default_factory=dict)
    perplexity: dict = field(default_factory=dict)


def shard(n: int, rank: int, world: int) -> tuple[list[int], list[int]]:
    """(this rank's record indices, the same padded to ceil(n / world) entries): equal forward calls on every rank."""
    share = math.ceil(n / world)
    mine = list(range(rank * share, min(n, (rank + 1) * share)))
    return mine, mine + [0] * (share - len(mine))


def _ppl(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(loss) if loss < 700 else float("inf")


SPLITS = ("validation", "test")  # what a final evaluation covers, in this order


@torch.no_grad()
def run_eval(
    model,
    tasks: list[TaskData],
    split: str,
    info: DistInfo,
    batch_size: int,
    should_stop: Callable[[], bool] | None = None,
    losses: bool = True,
    progress_bar: bool = True,
) -> EvalResult | None:
    """Metrics (rank 0) and, with ``losses``, per-task validation loss (all ranks) on ``split``.

    A task with any non-finite model output gets None (never a number computed from NaN). ``should_stop``
    is called before every batch on every rank (it may be collective); when it says stop, returns None.
    """
    was_training = model.training
    model.eval()
    result = EvalResult()
    todo = [(t, task) for t, task in enumerate(tasks) if task.splits.get(split)]
    calls = math.ceil(sum(math.ceil(len(task.splits[split]) / info.world) for _, task in todo) / batch_size)
    bar = progress(total=calls, enabled=progress_bar and info.main and calls > 0, desc=f"eval {split}")
    sums = torch.zeros(len(tasks), dtype=torch.float64)
    counts = torch.zeros(len(tasks), dtype=torch.float64)
    work: list[tuple[int, int, bool]] = []  # (task, record, real): this rank's share of every task, in task order
    for t, task in todo:
        mine, padded = shard(len(task.splits[split]), info.rank, info.world)
        work += [(t, i, j < len(mine)) for j, i in enumerate(padded)]
    preds: dict[int, list] = {t: [] for t, _ in todo}
    by_loss = frozenset(t for t, task in todo if task.config.metric == "loss")  # evaluated by their loss alone
    try:
        for lo in range(0, len(work), batch_size):  # batches mix tasks: same batches on every rank (equal shares)
            if should_stop is not None and should_stop():
                return None
            chunk = work[lo : lo + batch_size]
            records = [tasks[t].splits[split][i] for t, i, _ in chunk]
            batch = to_device(model.collate(records, [t for t, _, _ in chunk]), info.device)
            for (t, _, real), p in zip(chunk, model.predict(batch, skip_tasks=by_loss)):
                if real:
                    preds[t].append(p)
            if losses:
                keep = torch.tensor([1.0 if real else 0.0 for _, _, real in chunk])  # pads: weight 0
                s, c = model.task_loss_sums(batch, keep)
                sums += s.detach().double().cpu()
                counts += c.detach().double().cpu()
            bar.update(1)
        for t, task in todo:
            if t in by_loss:  # its loss (below) is its evaluation: nothing was predicted
                continue
            gathered = [p for part in gather_objects(info, preds[t]) for p in part]
            if info.main:
                finite = all(p is not None and (not isinstance(p, float) or math.isfinite(p)) for p in gathered)
                labels = [r["label"] for r in task.splits[split]]
                if task.config.type == "generation":  # the same extraction and normalisation on both sides
                    labels = [answer(task.config, y) for y in labels]
                result.metrics[task.name] = compute(task.config.metric, labels, gathered) if finite else None
    finally:
        bar.close()
        model.train(was_training)
    if result.metrics:
        values = list(result.metrics.values())
        result.metrics["average"] = None if any(v is None for v in values) else sum(values) / len(values)
    if losses and todo:
        sums, counts = sum_over_ranks(info, torch.stack([sums, counts]))
        causal = isinstance(model, CausalLMMultiTask)  # token-level loss: perplexity is meaningful
        for t, task in todo:
            loss = float(sums[t] / counts[t]) if counts[t] > 0 else None
            loss = loss if loss is not None and math.isfinite(loss) else None
            result.loss[task.name] = loss
            if causal:
                result.perplexity[task.name] = _ppl(loss)
    return result


def run_final_eval(model, tasks: list[TaskData], info: DistInfo, batch_size: int) -> dict[str, EvalResult]:
    """run_eval on every split of SPLITS (no stop signal: ``ortho-lora eval`` and the zero-shot baseline)."""
    return {s: run_eval(model, tasks, s, info, batch_size) for s in SPLITS}
