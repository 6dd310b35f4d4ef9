"""The ``train`` and ``distributed`` sections: the multi-task rule, the schedule, batching, checkpoints, trackers."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ortho_lora_dist.config.base import Strict
from ortho_lora_dist.engines import ENGINE_NAMES


class TrackingConfig(Strict):
    """Names for the trackers of train.report_to; unset keys leave the trackers' own environment variables in force
    (WANDB_PROJECT, WANDB_ENTITY, WANDB_NAME, WANDB_RUN_GROUP, WANDB_TAGS; MLFLOW_EXPERIMENT_NAME)."""

    project: str | None = None
    """W&B project / MLflow experiment (default: WANDB_PROJECT, else ortho-lora; MLflow: its default experiment)"""
    entity: str | None = None
    """W&B entity (team or user)"""
    run_name: str | None = None
    """the run's name (default: WANDB_NAME, else the output folder's name)"""
    group: str | None = None
    """W&B group (MLflow: a tag 'group'), e.g. one per comparison"""
    tags: list[str] = Field(default_factory=list)
    """W&B tags (MLflow: tags with value 'true')"""


class TrainConfig(Strict):
    strategy: str = Field(
        "joint",
        description="joint (default: no rule has beaten it distinguishably on the data we measured, docs/methods.md) "
        "| ortho (the paper's) | norm_balance | famo | initial_loss | a TorchJD weighting (see docs/design.md)",
    )
    strategy_options: dict[str, Any] = Field(default_factory=dict, description="options of the strategy, e.g. {c: 0.4}")
    gram: Literal["raw", "debiased", "ema"] = "raw"
    """what a Gram rule sees: raw (this step's task gradients' Gram), debiased (|G_t|^2 from the product of each task's
    two half-gradients: the signal without the noise tr(Sigma_t)/n_t; twice the per-task buffer and traffic; not with
    packing) or ema (an exponential moving average of the Grams over steps, gram_ema_beta); docs/guides/diagnose.md"""
    gram_ema_beta: float = Field(0.9, ge=0, lt=1, description="gram ema: E <- beta E + (1 - beta) G per step")
    noise_every: int = Field(0, ge=0)
    """log each task's gradient signal and noise every N steps (0: off): signal share, noise scale B_t and the debiased
    conflict C_st with its CI over the last N steps, overall and per block kind (attention, mlp), as `noise` records
    in metrics.jsonl (docs/guides/diagnose.md). Captures each task's two halves every step: twice the per-task
    buffer and traffic; not with packing; N >= 2"""
    granularity: Literal["factor", "module", "global"] = "factor"
    """the blocks a rule combines per: factor (every lora_A / lora_B: the paper's), module, or global"""
    mode: Literal["one_backward", "reference"] = "one_backward"
    """one_backward (all tasks' gradients from one backward) or reference (T backward passes: slow, for checks)"""
    reduce: Literal["auto", "step", "eager"] = "auto"
    """when per-task gradients are reduced across ranks: step (once per step), eager (per factor as the backward
    completes it), auto (eager without accumulation, step with accumulation when its buffer fits; logged at start)"""
    bucket_mb: float = Field(
        25.0,
        gt=0,
        description="reduce 'eager': MB of per-task gradients per asynchronous reduce "
        "(at most 1/16 of a rank's region)",
    )
    buffer_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype of the per-task gradient buffer (bfloat16: half its memory; Grams stay fp32/fp64)"
    )
    lr: float = Field(5e-4, gt=0)
    """AdamW learning rate"""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """learning-rate schedule after the warm-up"""
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    """share of the steps with a linear warm-up"""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay"""
    epochs: float | None = Field(None, gt=0)
    """length in epochs (default 1; see the epoch plan logged at start); or steps"""
    steps: int | None = Field(None, gt=0)
    """length in optimizer steps; or epochs"""
    per_task_batch_size: int = Field(
        32,
        gt=0,
        description="samples of EACH task per rank per micro-batch (task_sampling "
        "equal); otherwise a micro-batch holds per_task_batch_size x tasks samples per rank",
    )
    eval_batch_size: int | None = Field(
        None,
        gt=0,
        description="samples per evaluation batch, tasks mixed (default: per_task_batch_size x tasks, at least "
        "2 x per_task_batch_size: the training micro-batch, which fits in memory with gradients)",
    )
    task_sampling: Literal["equal", "proportional", "temperature", "weighted"] = Field(
        "equal",
        description="equal: every task per_task_batch_size samples per micro-batch; proportional / temperature: "
        "task shares drawn with p_t ~ n_t^(1/temperature) (proportional: temperature 1); weighted: p_t ~ "
        "tasks.N.sampling_weight; tasks.N.max_epochs caps any task (data/sampling.py)",
    )
    temperature: float = Field(2.0, gt=0, description="task_sampling temperature: p_t ~ n_t^(1/temperature)")
    gradient_accumulation: int = Field(1, gt=0)
    """micro-batches per optimizer step (the losses stay exact token means of the step)"""
    init_adapter: str | None = Field(
        None,
        description="warm start: LoRA weights (and task heads, matched by task name) of a saved adapter folder "
        "(PEFT's adapter_model.safetensors, e.g. a run's adapter/); a new optimizer; ignored when --resume finds a "
        "checkpoint",
    )
    gradient_checkpointing: bool = False
    """activation checkpointing: less memory, one more forward"""
    packing: bool = Field(
        False,
        description="causal-lm: pack each micro-batch's samples into rows of at most model.max_length tokens, "
        "attention inside each sample (sdpa / eager; flash_attention_2: one row); exact per-task gradients",
    )
    max_grad_norm: float = Field(0.0, ge=0, description="0: no clipping")
    seed: int = 0
    """seed of the data order, the task order and the initial LoRA weights"""
    log_every: int = Field(10, gt=0)
    """steps between metrics.jsonl records"""
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints (0: only at the end / on signal)")
    keep_checkpoints: int = Field(2, ge=0, description="newest checkpoints kept (0: all); the one resumed from is kept")
    eval_every: int = Field(0, ge=0)
    """steps between validation evaluations (0: at the end only)"""
    max_consecutive_skips: int = Field(10, gt=0)
    """steps with a non-finite gradient in a row after which the run stops"""
    plots: bool = True
    """draw the run's plots at the end"""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """project, entity, run name, group and tags of the trackers"""
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="trackers besides metrics.jsonl (always written): "
        "tensorboard, wandb (mode from WANDB_MODE), mlflow (MLFLOW_TRACKING_URI); [] for none",
    )

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, v: str) -> str:
        from ortho_lora_dist.core.strategies import get_spec

        get_spec(v)  # ValueError naming the closest and the valid ones (built-in, registered, plugins)
        return v

    @field_validator("report_to")
    @classmethod
    def _trackers(cls, v: list[str]) -> list[str]:
        """A tracker listed but not installed fails here, before anything loads, naming the extra to install."""
        missing = missing_trackers(v)
        if missing:
            raise ValueError("; ".join(missing))
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _gram(self) -> TrainConfig:
        from ortho_lora_dist.core.strategies import is_loss_only

        if self.gram != "raw" and is_loss_only(self.strategy):
            raise ValueError(f"train.gram {self.gram!r} needs a Gram rule; {self.strategy!r} is loss-only (no Grams)")
        if self.gram == "debiased" and self.packing:
            raise ValueError("train.gram 'debiased' splits each task's rows in two halves: set train.packing: false")
        if self.noise_every and (self.packing or is_loss_only(self.strategy) or self.noise_every < 2):
            raise ValueError(
                "train.noise_every captures each task's two halves by rows: it needs train.packing: false, a Gram "
                f"rule (not {self.strategy!r} if loss-only) and N >= 2 steps per window (got {self.noise_every})"
            )
        if self.gram != "raw" and self.mode != "one_backward":
            raise ValueError(f"train.gram {self.gram!r} needs train.mode: one_backward")
        return self

    @model_validator(mode="after")
    def _length(self) -> TrainConfig:
        if self.epochs is None and self.steps is None:
            self.epochs = 1.0
        if self.epochs is not None and self.steps is not None:
            raise ValueError("train: give either 'epochs' or 'steps', not both")
        return self


def missing_trackers(report_to) -> list[str]:
    """The trackers of ``report_to`` whose library is not installed, each with the pip extra that brings it."""
    import importlib.util

    extra = {"tensorboard": "tensorboard", "wandb": "ortho-lora-dist[wandb]", "mlflow": "ortho-lora-dist[mlflow]"}
    return [
        f"{name} is not installed (pip install '{extra[name]}')"
        for name in report_to
        if importlib.util.find_spec(name) is None
    ]


class DistributedConfig(Strict):
    engine: Literal[ENGINE_NAMES] = "ddp"
    """ddp, deepspeed (ZeRO-2) or fsdp (FSDP2, shards the frozen base)"""
    deepspeed_config: str = "ds_configs/zero2.json"
    """the DeepSpeed JSON (engine deepspeed); batch sizes and clipping are set from train"""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """process-group backend (auto: nccl on GPUs, gloo on CPUs)"""
    data_cache: str | None = "auto"
    """where a job's ranks share the prepared training data (read, checked, fitted to model.max_length; one folder
    per fingerprint of the data, tasks and tokenizer): rank 0 prepares, the others wait and read it, a requeue or a
    run on the same data reuses it. auto: $ORTHO_LORA_DATA_CACHE, else $HF_HOME/ortho_lora_dist/data; a folder
    (every node must see it); null:
    every rank prepares its own"""
