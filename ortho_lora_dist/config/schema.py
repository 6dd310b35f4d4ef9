"""The whole run configuration: its sections, and the checks that span them (task kinds vs model kind,
packing, strategy options)."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from ortho_lora_dist.config.base import Strict
from ortho_lora_dist.config.model import LoraConfigModel, ModelConfig
from ortho_lora_dist.config.task import TaskConfig
from ortho_lora_dist.config.train import DistributedConfig, TrainConfig

# Defaults that depend on model.kind, for the keys a config leaves unset (the run's config.yaml holds them resolved).
# A causal LM's instruction samples are long (128 tokens would cut most prompts), its LoRA usually spans every linear
# layer (QLoRA's choice), and a 7B step holds far fewer samples than an encoder's; dtype: bf16 where the GPU has it.
CAUSAL_LM_DEFAULTS = {
    ("model", "max_length"): 1024,
    ("model", "dtype"): lambda: "bfloat16" if _cuda_bf16() else "float32",
    ("lora", "target_modules"): "all-linear",
    ("train", "per_task_batch_size"): 4,
}


def _cuda_bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


class Config(Strict):
    model: ModelConfig
    """what to load"""
    lora: LoraConfigModel = Field(default_factory=LoraConfigModel)
    """the shared adapter"""
    tasks: list[TaskConfig]
    """the tasks, one entry each (at least one)"""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """the optimisation, the multi-task rule, logging and checkpoints"""
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    """the engine across ranks"""
    output_dir: str = "runs/default"
    """the run's folder (adapter/, checkpoints/, metrics.jsonl, eval.json, ...)"""

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, tasks: list[TaskConfig]) -> list[TaskConfig]:
        if not tasks:
            raise ValueError("at least one task is needed")
        names = [t.name for t in tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate task names: {', '.join(dup)}")
        return tasks

    @model_validator(mode="after")
    def _kind_defaults(self) -> Config:
        """Fill CAUSAL_LM_DEFAULTS into the keys a causal-LM config leaves unset."""
        if self.model.kind == "causal-lm":
            for (section, key), value in CAUSAL_LM_DEFAULTS.items():
                part = getattr(self, section)
                if key not in part.model_fields_set:
                    setattr(part, key, value() if callable(value) else value)
        return self

    @model_validator(mode="after")
    def _tasks_fit_the_model(self) -> Config:
        """What the model kind can train, checked before anything loads: one error naming the task and key."""
        for i, t in enumerate(self.tasks):
            where = f"tasks.{i} ({t.name!r})"
            if self.model.kind == "encoder-classification" and t.type == "generation":
                why = f"format {t.format!r} makes it a generation task" if t.format != "text" else "type: generation"
                raise ValueError(
                    f"{where}: {why}, which needs model.kind: causal-lm (the encoder has one head per "
                    "task and generates no text)"
                )
            if self.model.kind == "causal-lm" and t.type == "regression":
                raise ValueError(f"{where}: type regression needs model.kind: encoder-classification")
            if self.model.kind == "causal-lm" and t.type == "classification" and not t.label_words:
                raise ValueError(
                    f"{where}: a classification task on a causal LM needs label_words (the text "
                    "each label is scored as)"
                )
        return self

    @model_validator(mode="after")
    def _packing_needs_a_causal_lm(self) -> Config:
        if self.train.packing and self.model.kind != "causal-lm":
            raise ValueError(
                "train.packing: packs causal-LM token sequences; model.kind is encoder-classification (one pooled "
                "vector per sample): set train.packing: false"
            )
        return self

    @model_validator(mode="after")
    def _strategy_options(self) -> Config:
        """Build the strategy once (cheap): unknown options, bad values and missing solvers fail here, named."""
        from ortho_lora_dist.core.strategies import make_strategy

        try:
            make_strategy(self.train.strategy, self.train.strategy_options, len(self.tasks), 1)
        except ImportError as e:
            raise ValueError(str(e).split(" (")[0]) from None
        except ValueError as e:
            raise ValueError(f"train.strategy_options: {e}") from None
        return self


def eval_batch_size(cfg: Config) -> int:
    """train.eval_batch_size, else per_task_batch_size x tasks (at least 2 x per_task_batch_size)."""
    tc = cfg.train
    return tc.eval_batch_size or tc.per_task_batch_size * max(2, len(cfg.tasks))
