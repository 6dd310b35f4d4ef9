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
    strategy: str = Field("ortho", description="ortho | joint | norm_balance | a TorchJD weighting (see docs/design.md)")
    strategy_options: dict[str, Any] = Field(default_factory=dict, description="options of the strategy, e.g. {c: 0.4}")
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
    keep_checkpoints: int = Field(2, ge=0, description="newest checkpoints kept (0: all); the one resumed from is kept")
    eval_every: int = Field(0, ge=0)
    max_consecutive_skips: int = Field(10, gt=0)
    plots: bool = True

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, v: str) -> str:
        from .aggregators import STRATEGIES

        if v not in STRATEGIES:
            close = difflib.get_close_matches(v, STRATEGIES, n=1)
            raise ValueError(f"unknown strategy {v!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                             f"choose from {', '.join(STRATEGIES)}")
        return v

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

    @model_validator(mode="after")
    def _strategy_options(self) -> "Config":
        """Build the strategy once (cheap): unknown options, bad values and missing solvers fail here, named."""
        from .aggregators import make_strategy

        try:
            make_strategy(self.train.strategy, self.train.strategy_options, len(self.tasks), 1)
        except ImportError as e:
            raise ValueError(str(e).split(" (")[0]) from None
        except ValueError as e:
            raise ValueError(f"train.strategy_options: {e}") from None
        return self


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


# Names users bring from HF Trainer / PEFT / axolotl -> ours.
ALIASES = {
    "learning_rate": "train.lr", "lrate": "train.lr", "num_train_epochs": "train.epochs", "num_epochs": "train.epochs",
    "max_steps": "train.steps", "gradient_accumulation_steps": "train.gradient_accumulation",
    "per_device_train_batch_size": "train.per_task_batch_size", "micro_batch_size": "train.per_task_batch_size",
    "batch_size": "train.per_task_batch_size", "warmup_steps": "train.warmup_ratio (a fraction of the steps)",
    "save_steps": "train.checkpoint_every", "save_total_limit": "train.keep_checkpoints",
    "logging_steps": "train.log_every", "eval_steps": "train.eval_every", "lr_scheduler_type": "train.schedule",
    "max_grad_norm": "train.max_grad_norm", "bf16": "model.dtype: bfloat16", "fp16": "model.dtype: float16",
    "report_to": "(not supported yet: metrics go to metrics.jsonl and TensorBoard)", "lora_r": "lora.r",
    "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout", "lora_target_modules": "lora.target_modules",
    "base_model": "model.name_or_path", "model_name_or_path": "model.name_or_path", "sequence_len": "model.max_length",
    "max_seq_length": "model.max_length", "load_in_4bit": "model.quantization: nf4", "load_in_8bit": "model.quantization: int8",
    "seed": "train.seed", "gradient_checkpointing": "train.gradient_checkpointing", "output_dir": "output_dir",
    "deepspeed": "distributed.deepspeed_config",
}


def _hint(key: str, valid: list[str]) -> str:
    if key in ALIASES:
        return f" (did you mean '{ALIASES[key]}'?)"
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if not close:
        close = [v for v in valid if v.startswith(key[:2]) and len(key) >= 2 and (key.startswith(v) or v.startswith(key))]
    return f" (did you mean '{close[0]}'?)" if close else (f" (valid: {', '.join(valid)})" if valid else "")


def _describe(err: dict, source: str) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        parent = _model_for(tuple(err["loc"][:-1]))
        valid = list(parent.model_fields) if parent else []
        return f"{source}: unknown key '{loc}'{_hint(str(err['loc'][-1]), valid)}"
    if err["type"] == "missing":
        return f"{source}: missing required key '{loc}'"
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{source}: '{loc}': {msg}{shown}" if loc else f"{source}: {msg}"


def _set(tree: dict, dotted: str, value: Any, item: str) -> None:
    """tree[a][b][c] = value for dotted 'a.b.c' (list indices as numbers); errors name the override."""
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override '{item}': '{here}' does not exist ('{'.'.join(parts[:i]) or 'top'}' "
                                  f"is a list of {len(node)} entries, indices 0..{len(node) - 1})")
            key: Any = int(part)
        elif isinstance(node, dict):
            key = part
        else:
            raise ConfigError(f"override '{item}': '{'.'.join(parts[:i])}' is a value ({node!r}), not a section, "
                              f"so it has no key '{part}'")
        if i == len(parts) - 1:
            node[key] = value
        else:
            if isinstance(node, dict) and node.get(key) is None:
                node[key] = {}
            node = node[key]


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read YAML, apply ``key.sub=value`` overrides (values parsed as YAML), validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    raw_bytes = path.read_bytes()
    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw_bytes[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}, line {line}: not UTF-8 text (byte 0x{raw_bytes[e.start]:02x}); save the file as UTF-8") from None
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model, lora, tasks, train, ...)")
    keys = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        key = key.strip()
        _set(tree, key, value, item)
        keys.append((key, item))
    # train.steps given on the command line replaces the file's train.epochs (and the reverse)
    given = {k for k, _ in keys}
    train = tree.get("train") if isinstance(tree.get("train"), dict) else None
    if train is not None:
        for mine, other in (("steps", "epochs"), ("epochs", "steps")):
            if f"train.{mine}" in given and f"train.{other}" not in given and train.get(mine) is not None:
                train[other] = None
    return validate_config(tree, str(path), dict(keys))


def validate_config(tree: dict, source: str = "config", overrides: dict[str, str] | None = None) -> Config:
    """Validate; an error at a key set by an override names the override instead of the file."""
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        errors = e.errors()
        lines = []
        for err in errors:
            loc = ".".join(str(p) for p in err["loc"])
            item = next((v for k, v in (overrides or {}).items() if loc == k or loc.startswith(k + ".") or k.startswith(loc + ".")), None)
            lines.append(_describe(err, f"override '{item}'" if item else source))
        raise ConfigError(lines[0] if len(lines) == 1 else "\n".join(lines)) from None
