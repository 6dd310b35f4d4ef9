"""From the config to the step and the engine: OrthoLoRA's options and reduction policy, the engine's settings."""

from __future__ import annotations

import logging

from torch import nn

from ortho_lora_dist.config import Config, ConfigError
from ortho_lora_dist.core.engines.base import Engine
from ortho_lora_dist.core.step import OrthoLoRA
from ortho_lora_dist.core.strategies import is_loss_only
from ortho_lora_dist.engines import EngineSettings, engine_spec
from ortho_lora_dist.runtime.distributed import DistInfo

log = logging.getLogger("ortho_lora_dist")


STEP_BUFFER_BUDGET = 2 * 1024**3  # bytes per rank a whole-step per-task buffer may take before auto prefers eager


def choose_reduce(world: int, accum: int, tasks: int, params: int, value_bytes: int) -> tuple[str, str]:
    """(policy, why) for train.reduce: auto. With one rank nothing is reduced: step. With N ranks, eager reduces each
    factor's T per-task gradients as the backward completes it (T x P / N owned per rank) but once per MICRO-batch;
    step keeps the whole T x P buffer and reduces once per optimizer step. So: eager without accumulation (the same
    bytes, less memory); with accumulation k > 1, step when its buffer fits STEP_BUFFER_BUDGET (k times fewer bytes)."""
    buffer = tasks * params * value_bytes
    if world == 1:
        return "step", "one rank: nothing to reduce"
    per_step = {"step": buffer, "eager": accum * buffer}
    choice = "step" if accum > 1 and buffer <= STEP_BUFFER_BUDGET else "eager"
    mb = 1024**2
    why = (
        f"{accum} micro-batch(es) per step, per-task buffer T x P = {tasks} x {params:,} values = "
        f"{buffer / mb:,.1f} MB per rank: {per_step[choice] / mb:,.1f} MB reduced per optimizer step per rank "
        f"(the other policy: {per_step['eager' if choice == 'step' else 'step'] / mb:,.1f} MB"
        + (", but a whole-step buffer over the budget" if choice == "eager" and accum > 1 else "")
        + ")"
    )
    return choice, why


def build_ortho_lora(cfg: Config, model: nn.Module, info: DistInfo, halves: bool = False) -> OrthoLoRA:
    """The step: strategy, granularity, capture mode and reduction of ``train``; norm_balance's default preferences.
    ``halves``: capture each task's two halves apart (2T groups: gram debiased, noise telemetry, diagnose)."""
    groups = 2 * len(cfg.tasks) if halves else None
    tc = cfg.train
    reduce = tc.reduce
    if reduce == "auto":
        params = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
        grad_tasks = 1 if is_loss_only(tc.strategy) else groups or len(cfg.tasks)
        value_bytes = 2 if tc.buffer_dtype == "bfloat16" else 4
        reduce, why = choose_reduce(info.world, tc.gradient_accumulation, grad_tasks, params, value_bytes)
        if info.main and info.world > 1:
            log.info("train.reduce: %s (auto: %s)", reduce, why)
    options = dict(tc.strategy_options)
    if tc.strategy == "norm_balance" and "pref_vector" not in options:  # loss weights = target norm shares
        # (a task with loss_weight 0 has g_t = 0 and gets weight 0 whatever its preference)
        options["pref_vector"] = [t.loss_weight if t.loss_weight > 0 else 1.0 for t in cfg.tasks]
    try:
        return _ortho_lora(cfg, model, info, reduce, options, groups or len(cfg.tasks), halves)
    except ValueError as e:  # what the capture or the strategy refuses is the config's doing: one line, exit 2
        raise ConfigError(str(e)) from None


def _ortho_lora(
    cfg: Config, model: nn.Module, info: DistInfo, reduce: str, options: dict, groups: int, halves: bool
) -> OrthoLoRA:
    tc = cfg.train
    return OrthoLoRA(
        model,
        groups,
        strategy=tc.strategy,
        strategy_options=options,
        granularity=tc.granularity,
        seed=tc.seed,
        mode=tc.mode,
        task_params=model.task_params(),
        comm=info.comm,
        reduce=reduce,
        bucket_mb=tc.bucket_mb,
        buffer_dtype=tc.buffer_dtype,
        gram=tc.gram,
        gram_ema_beta=tc.gram_ema_beta,
        halves=halves,
    )


def build_engine(
    cfg: Config, model: nn.Module, olr: OrthoLoRA, info: DistInfo, total_steps: int, micro_batch: int
) -> Engine:
    """The optimizer(s), scheduler(s) and engine adapter of ``distributed.engine`` (engines/: its spec builds it)."""
    tc = cfg.train
    settings = EngineSettings(
        lr=tc.lr,
        weight_decay=tc.weight_decay,
        max_grad_norm=tc.max_grad_norm,
        schedule=tc.schedule,
        warmup_ratio=tc.warmup_ratio,
        total_steps=total_steps,
        micro_batch=micro_batch,
        bf16=cfg.model.dtype == "bfloat16",
        deepspeed_config=cfg.distributed.deepspeed_config,
    )
    return engine_spec(cfg.distributed.engine).build(settings, model, olr, info)
