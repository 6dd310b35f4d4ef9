"""YAML (safe_load) + ``key.sub=value`` overrides -> a validated Config. An unknown key is an error naming it
and the closest valid key; a wrong type names the key and the expected type."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ortho_lora_dist.config.schema import Config


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
