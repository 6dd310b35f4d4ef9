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
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)  # inf / nan: refused


class ModelConfig(Strict):
    name_or_path: str = Field(
        description="local directory, hub id, or pkg://PACKAGE/SUBDIR (a model shipped in a package)"
    )
    kind: Literal["encoder-classification", "causal-lm"] = "encoder-classification"
    quantization: Literal["none", "nf4", "int8"] = "none"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    pooling: Literal["mean", "cls"] = "mean"
    max_length: int = Field(128, gt=0)
    trust_remote_code: bool = False
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        None, description="causal-lm: transformers' attention implementation (default: transformers' choice, sdpa)"
    )


class LoraConfigModel(Strict):
    r: int = Field(8, gt=0)
    alpha: float = Field(16, gt=0, description="LoRA scaling alpha / r (0 would make every LoRA gradient 0)")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(default_factory=lambda: ["query", "value"])
    use_rslora: bool = False


class GenerationOptions(Strict):
    """Decoding of a generation task (greedy, batched with left padding; see generation.py)."""

    max_new_tokens: int = Field(32, gt=0, description="tokens generated at most per answer")
    stop: list[str] = Field(default_factory=list, description="the answer ends before the first of these strings")


class TaskConfig(Strict):
    name: str
    dataset: str | None = Field(None, description="HF dataset id (loaded with datasets.load_dataset)")
    dataset_config: str | None = None
    files: dict[Literal["train", "validation", "test"], str] | None = Field(
        None, description="local files: JSONL, JSON array (.json), CSV/TSV, Parquet, or a save_to_disk folder"
    )
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
    prompt: str | None = Field(
        None,
        description="format text: '{text}' / '{text_pair}' template (default "
        "'{text}\\nAnswer:'); alpaca: '{instruction}' / '{input}' (default: Alpaca's templates)",
    )
    label_words: dict[str, str] | None = None
    generation: GenerationOptions = Field(
        default_factory=GenerationOptions, description="generation tasks: max_new_tokens, stop"
    )
    answer_regex: str | None = Field(
        None, description="scored answer: first capture group (or whole match), on prediction and reference"
    )
    extract: Literal["none", "last_number", "gsm8k"] = Field(
        "none", description="named answer extractor (instead of answer_regex)"
    )
    normalize: Literal["default", "lowercase", "strip", "list"] = Field(
        "default", description="answer normalisation before exact_match (list: comma-separated items)"
    )
    max_train_samples: int | None = Field(None, gt=0)
    max_eval_samples: int | None = Field(None, gt=0)
    format: Literal["text", "alpaca", "chat"] = Field(
        "text",
        description="record layout: text (+pair) and label, instruction/input/output, or chat messages (see README)",
    )
    instruction_field: str = "instruction"
    input_field: str = Field("input", description="alpaca: optional per record (missing or empty: no input)")
    output_field: str = "output"
    messages_field: str = Field(
        "messages", description="chat: a list of {role, content}; the last is the assistant's answer"
    )
    train_on_inputs: bool = Field(False, description="causal-lm: loss on the prompt tokens too (default: answer only)")
    validation_fraction: float | None = Field(
        None, gt=0, lt=1, description="hold out this share of train as validation"
    )
    validation_seed: int = Field(0, description="seed of the validation_fraction split (fixed across train.seed)")

    @model_validator(mode="after")
    def _source(self) -> TaskConfig:
        if (self.dataset is None) == (self.files is None):
            raise ValueError(f"task {self.name!r}: give exactly one of 'dataset' (HF id) or 'files' (local JSONL/CSV)")
        if self.files is not None and "train" not in self.files:
            raise ValueError(f"task {self.name!r}: files needs a 'train' entry")
        given = self.model_fields_set
        if self.format != "text":  # the answer is text: generation, scored by exact match unless told otherwise
            if "type" not in given:
                self.type = "generation"
            elif self.type != "generation":
                raise ValueError(
                    f"task {self.name!r}: format {self.format!r} makes a generation task (its answer is "
                    f"text), not {self.type!r}: remove 'type' or set type: generation"
                )
            if "metric" not in given:
                self.metric = "exact_match"
        if self.format == "chat" and self.prompt is not None:
            raise ValueError(
                f"task {self.name!r}: format 'chat' renders the messages with the tokenizer's chat template: "
                "remove 'prompt'"
            )
        if self.format == "text" and self.prompt is None:
            self.prompt = "{text}\nAnswer:"
        if self.prompt is not None:
            import string

            allowed = {"text": {"text", "text_pair"}, "alpaca": {"instruction", "input"}}[self.format]
            try:
                names = {f for _, f, _, _ in string.Formatter().parse(self.prompt) if f is not None}
            except ValueError as e:
                raise ValueError(
                    f"task {self.name!r}: prompt is not a valid template ({e}; write {{{{ and }}}} for braces)"
                ) from None
            bad = sorted(names - allowed)
            if bad:
                raise ValueError(
                    f"task {self.name!r}: prompt uses {', '.join('{' + b + '}' for b in bad)}; format "
                    f"{self.format!r} fills {', '.join('{' + a + '}' for a in sorted(allowed))}"
                )
        if self.validation_fraction is not None:
            if self.files is not None and "validation" in self.files:
                raise ValueError(f"task {self.name!r}: give either files.validation or validation_fraction, not both")
            if self.dataset is not None and "eval_split" in given:
                raise ValueError(f"task {self.name!r}: give either eval_split or validation_fraction, not both")
        return self

    @model_validator(mode="after")
    def _answer(self) -> TaskConfig:
        if self.answer_regex is not None:
            if self.extract != "none":
                raise ValueError(f"task {self.name!r}: give answer_regex or extract, not both")
            import re

            try:
                re.compile(self.answer_regex)
            except re.error as e:
                raise ValueError(
                    f"task {self.name!r}: answer_regex {self.answer_regex!r} is not a valid regular expression ({e})"
                ) from None
        return self


class TrainConfig(Strict):
    strategy: str = Field(
        "ortho", description="ortho | joint | norm_balance | a TorchJD weighting (see docs/design.md)"
    )
    strategy_options: dict[str, Any] = Field(default_factory=dict, description="options of the strategy, e.g. {c: 0.4}")
    granularity: Literal["factor", "module", "global"] = "factor"
    mode: Literal["one_backward", "reference"] = "one_backward"
    reduce: Literal["auto", "step", "eager"] = "auto"
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
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    epochs: float | None = Field(None, gt=0)
    steps: int | None = Field(None, gt=0)
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
    task_sampling: Literal["equal", "proportional", "temperature"] = Field(
        "equal",
        description="equal: every task per_task_batch_size samples per micro-batch; proportional / temperature: "
        "task shares drawn with p_t ~ n_t^(1/temperature) (proportional: temperature 1); see docs/design.md",
    )
    temperature: float = Field(2.0, gt=0, description="task_sampling temperature: p_t ~ n_t^(1/temperature)")
    gradient_accumulation: int = Field(1, gt=0)
    gradient_checkpointing: bool = False
    packing: bool = Field(
        False,
        description="causal-lm: pack each micro-batch's samples into rows of at most model.max_length tokens, "
        "attention inside each sample (sdpa / eager; flash_attention_2: one row); exact per-task gradients",
    )
    max_grad_norm: float = Field(0.0, ge=0, description="0: no clipping")
    seed: int = 0
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints (0: only at the end / on signal)")
    keep_checkpoints: int = Field(2, ge=0, description="newest checkpoints kept (0: all); the one resumed from is kept")
    eval_every: int = Field(0, ge=0)
    max_consecutive_skips: int = Field(10, gt=0)
    plots: bool = True
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="trackers besides metrics.jsonl (always written): "
        "tensorboard, wandb (mode from WANDB_MODE), mlflow (MLFLOW_TRACKING_URI); [] for none",
    )

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, v: str) -> str:
        from ortho_lora_dist.core.strategies import STRATEGIES

        if v not in STRATEGIES:
            close = difflib.get_close_matches(v, STRATEGIES, n=1)
            raise ValueError(
                f"unknown strategy {v!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                f"choose from {', '.join(STRATEGIES)}"
            )
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


class ConfigError(ValueError):
    """A config problem, with the file and key it is about."""


def eval_batch_size(cfg: Config) -> int:
    """train.eval_batch_size, else per_task_batch_size x tasks (at least 2 x per_task_batch_size)."""
    tc = cfg.train
    return tc.eval_batch_size or tc.per_task_batch_size * max(2, len(cfg.tasks))


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
    "learning_rate": "train.lr",
    "lrate": "train.lr",
    "num_train_epochs": "train.epochs",
    "num_epochs": "train.epochs",
    "max_steps": "train.steps",
    "gradient_accumulation_steps": "train.gradient_accumulation",
    "per_device_train_batch_size": "train.per_task_batch_size",
    "micro_batch_size": "train.per_task_batch_size",
    "batch_size": "train.per_task_batch_size",
    "warmup_steps": "train.warmup_ratio (a fraction of the steps)",
    "save_steps": "train.checkpoint_every",
    "save_total_limit": "train.keep_checkpoints",
    "logging_steps": "train.log_every",
    "eval_steps": "train.eval_every",
    "lr_scheduler_type": "train.schedule",
    "max_grad_norm": "train.max_grad_norm",
    "bf16": "model.dtype: bfloat16",
    "fp16": "model.dtype: float16",
    "report_to": "train.report_to",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
    "base_model": "model.name_or_path",
    "model_name_or_path": "model.name_or_path",
    "sequence_len": "model.max_length",
    "max_seq_length": "model.max_length",
    "load_in_4bit": "model.quantization: nf4",
    "load_in_8bit": "model.quantization: int8",
    "seed": "train.seed",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "output_dir": "output_dir",
    "deepspeed": "distributed.deepspeed_config",
}


def _hint(key: str, valid: list[str]) -> str:
    if key in ALIASES:
        return f" (did you mean '{ALIASES[key]}'?)"
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if not close:
        close = [
            v for v in valid if v.startswith(key[:2]) and len(key) >= 2 and (key.startswith(v) or v.startswith(key))
        ]
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
                raise ConfigError(
                    f"override '{item}': '{here}' does not exist ('{'.'.join(parts[:i]) or 'top'}' "
                    f"is a list of {len(node)} entries, indices 0..{len(node) - 1})"
                )
            key: Any = int(part)
        elif isinstance(node, dict):
            key = part
        else:
            raise ConfigError(
                f"override '{item}': '{'.'.join(parts[:i])}' is a value ({node!r}), not a section, "
                f"so it has no key '{part}'"
            )
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
        raise ConfigError(
            f"{path}, line {line}: not UTF-8 text (byte 0x{raw_bytes[e.start]:02x}); save the file as UTF-8"
        ) from None
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
    return resolve_paths(validate_config(tree, str(path), dict(keys)), path.parent)


def _resolve(value: str, base: Path) -> str | None:
    """A relative path: the config folder's if it exists there, else the current folder's; None if neither."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    for root in (base, Path.cwd()):
        if (root / path).exists():
            return str((root / path).resolve())
    return None


def resolve_paths(cfg: Config, base: str | Path) -> Config:
    """Relative ``tasks[].files`` and ``distributed.deepspeed_config`` resolve against ``base`` (the config's folder).

    Order: the config's folder, then the current folder (configs written before this rule keep working),
    then, for the DeepSpeed config only, the copy shipped with the package (``ds_configs/zero2.json`` works
    from anywhere). A path found nowhere is left as written, so the error that follows names it as written.
    Absolute paths are kept as they are.
    """
    base = Path(base)
    for task in cfg.tasks:
        if task.files:
            task.files = {split: _resolve(f, base) or f for split, f in task.files.items()}
    ds = cfg.distributed.deepspeed_config
    found = _resolve(ds, base)
    if found is None and not Path(ds).is_absolute():
        from ortho_lora_dist.runtime.resources import packaged_file

        shipped = packaged_file(ds)
        found = str(shipped) if shipped is not None else None
    cfg.distributed.deepspeed_config = found or ds
    return cfg


def validate_config(tree: dict, source: str = "config", overrides: dict[str, str] | None = None) -> Config:
    """Validate; an error at a key set by an override names the override instead of the file."""
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        errors = e.errors()
        lines = []
        for err in errors:
            loc = ".".join(str(p) for p in err["loc"])
            item = next(
                (
                    v
                    for k, v in (overrides or {}).items()
                    if loc == k or loc.startswith(k + ".") or k.startswith(loc + ".")
                ),
                None,
            )
            lines.append(_describe(err, f"override '{item}'" if item else source))
        raise ConfigError(lines[0] if len(lines) == 1 else "\n".join(lines)) from None
