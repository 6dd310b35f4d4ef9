"""The typed run configuration: YAML (safe_load) + ``key.sub=value`` overrides, validated by pydantic
before anything heavy loads. An unknown key is an error naming it and the closest valid key; a wrong
type names the key and the expected type. The resolved config is saved with every checkpoint.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelConfig(Strict):
    name_or_path: str = Field(description="local directory, hub id, or pkg://PACKAGE/SUBDIR (a model shipped in a package)")
    kind: Literal["encoder-classification", "causal-lm"] = "encoder-classification"
    quantization: Literal["none", "nf4", "int8"] = "none"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    pooling: Literal["mean", "cls"] = "mean"
    max_length: int = Field(128, gt=0)
    trust_remote_code: bool = False


class LoraConfigModel(Strict):
    r: int = Field(8, gt=0)
    alpha: float = 16
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(default_factory=lambda: ["query", "value"])
    use_rslora: bool = False


class TaskConfig(Strict):
    name: str
    dataset: str | None = Field(None, description="HF dataset id (loaded with datasets.load_dataset)")
    dataset_config: str | None = None
    files: dict[Literal["train", "validation", "test"], str] | None = Field(None, description="local JSONL or CSV files")
    train_split: str = "train"
    eval_split: str = "validation"
    test_split: str | None = None
    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    type: Literal["classification", "regression", "generation"] = "classification"
    labels: list[str] | None = Field(None, description="label set (default: the labels seen in train, sorted)")
    metric: Literal["accuracy", "f1", "macro_f1", "mcc", "pearson", "spearman", "exact_match"] = "accuracy"
    loss_weight: float = Field(1.0, ge=0)
    prompt: str = "{text}\nAnswer:"
    label_words: dict[str, str] | None = None
    max_train_samples: int | None = Field(None, gt=0)
    max_eval_samples: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _source(self) -> "TaskConfig":
        if (self.dataset is None) == (self.files is None):
            raise ValueError(f"task {self.name!r}: give exactly one of 'dataset' (HF id) or 'files' (local JSONL/CSV)")
        if self.files is not None and "train" not in self.files:
            raise ValueError(f"task {self.name!r}: files needs a 'train' entry")
        return self


class TrainConfig(Strict):
    strategy: Literal["ortho", "joint"] = "ortho"
    granularity: Literal["factor", "module", "global"] = "factor"
    mode: Literal["one_backward", "reference"] = "one_backward"
    reduce: Literal["auto", "step", "eager"] = "auto"
    lr: float = Field(5e-4, gt=0)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    epochs: float | None = Field(None, gt=0)
    steps: int | None = Field(None, gt=0)
    per_task_batch_size: int = Field(32, gt=0, description="samples of EACH task per rank per micro-batch")
    gradient_accumulation: int = Field(1, gt=0)
    gradient_checkpointing: bool = False
    max_grad_norm: float = Field(0.0, ge=0, description="0: no clipping")
    seed: int = 0
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints (0: only at the end / on signal)")
    eval_every: int = Field(0, ge=0)
    max_consecutive_skips: int = Field(10, gt=0)
    plots: bool = True

    @model_validator(mode="after")
    def _length(self) -> "TrainConfig":
        if self.epochs is None and self.steps is None:
            self.epochs = 1.0
        if self.epochs is not None and self.steps is not None:
            raise ValueError("train: give either 'epochs' or 'steps', not both")
        return self


class DistributedConfig(Strict):
    engine: Literal["ddp", "deepspeed", "fsdp"] = "ddp"
    deepspeed_config: str = "ds_configs/zero2.json"
    backend: Literal["auto", "gloo", "nccl"] = "auto"


class Config(Strict):
    model: ModelConfig
    lora: LoraConfigModel = Field(default_factory=LoraConfigModel)
    tasks: list[TaskConfig]
    train: TrainConfig = Field(default_factory=TrainConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    output_dir: str = "runs/default"

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


class ConfigError(ValueError):
    """A config problem, with the file and key it is about."""


def _model_for(loc: tuple, root: type[BaseModel] = Config) -> type[BaseModel] | None:
    model: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ()) or ()
        candidates = [ann, *args, *(a for arg in args for a in getattr(arg, "__args__", ()) or ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model


def _describe(err: dict, source: str) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        parent = _model_for(tuple(err["loc"][:-1]))
        valid = list(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(err["loc"][-1]), valid, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else (f" (valid: {', '.join(valid)})" if valid else "")
        return f"{source}: unknown key '{loc}'{hint}"
    if err["type"] == "missing":
        return f"{source}: missing required key '{loc}'"
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{source}: '{loc}': {msg}{shown}" if loc else f"{source}: {msg}"


def _set(tree: dict, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        key: Any = int(part) if isinstance(node, list) and part.isdigit() else part
        try:
            node = node[key] if isinstance(node, list) else node.setdefault(key, {})
        except (IndexError, TypeError):
            raise ConfigError(f"{source}: override '{dotted}': '{'.'.join(parts[: i + 1])}' does not exist") from None
    last: Any = int(parts[-1]) if isinstance(node, list) and parts[-1].isdigit() else parts[-1]
    node[last] = value


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read YAML, apply ``key.sub=value`` overrides (values parsed as YAML), validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model, lora, tasks, train, ...)")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        _set(tree, key.strip(), yaml.safe_load(raw), "override")
    return validate_config(tree, str(path))


def validate_config(tree: dict, source: str = "config") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        errors = e.errors()
        lines = [_describe(err, source) for err in errors]
        raise ConfigError(lines[0] if len(lines) == 1 else "\n".join(lines)) from None
