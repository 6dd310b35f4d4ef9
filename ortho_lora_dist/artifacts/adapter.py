"""The self-describing adapter directory: ``predict`` and ``merge`` need nothing else (no config, no data).

  adapter_model.safetensors   LoRA factors (PEFT)
  adapter_config.json         PEFT's config; ``base_model_name_or_path`` is the config's ``model.name_or_path``
                              as given (hub id, local path or ``pkg://PACKAGE/SUBDIR``), never a resolved path
  heads.safetensors           encoder task heads, ``heads.<task>.weight`` / ``heads.<task>.bias``
  tasks.json                  ``model`` (kind, pooling, max_length, quantization, dtype, base id), ``lora``,
                              ``train`` (method and key settings), ``tasks`` (type, labels, label_words, prompt,
                              metric, text_pair, head keys, generation options and answer extraction)
  README.md                   the model card (card.py)
Each task's ``format`` (text | alpaca | chat; absent in older adapters: text) tells predict which input fields a
record needs (text / instruction + input / messages) and how its prompt is built.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ortho_lora_dist.config import Config, GenerationOptions, LoraConfigModel, ModelConfig, TaskConfig
from ortho_lora_dist.data.loading import TaskData
from ortho_lora_dist.models.build import build_model
from ortho_lora_dist.models.loading import load_tokenizer
from ortho_lora_dist.models.placement import place_model
from ortho_lora_dist.runtime import jsonio
from ortho_lora_dist.runtime import run_files as rf

FORMAT = 1
PEFT_TASK_TYPES = {"encoder-classification": "FEATURE_EXTRACTION", "causal-lm": "CAUSAL_LM"}

log = logging.getLogger("ortho_lora_dist")


class AdapterError(ValueError):
    """An adapter directory that cannot serve the request (not ours, too old, quantized base for merge)."""


def describe(cfg, tasks, step: int, total_steps: int) -> dict:
    """tasks.json: everything needed to rebuild the model and read its outputs (``tasks``: TaskData)."""
    encoder = cfg.model.kind == "encoder-classification"
    tc = cfg.train
    return {
        "format": FORMAT,
        "model": cfg.model.model_dump(),
        "lora": cfg.lora.model_dump(),
        "train": {
            "strategy": tc.strategy,
            "strategy_options": tc.strategy_options,
            "granularity": tc.granularity,
            "mode": tc.mode,
            "lr": tc.lr,
            "schedule": tc.schedule,
            "step": step,
            "total_steps": total_steps,
            "per_task_batch_size": tc.per_task_batch_size,
            "gradient_accumulation": tc.gradient_accumulation,
            "seed": tc.seed,
        },
        "tasks": [
            {
                "name": t.name,
                "type": t.config.type,
                "labels": t.labels,
                "label_words": t.config.label_words,
                "prompt": None if encoder else t.config.prompt,
                "metric": t.config.metric,
                # text | alpaca | chat: which fields predict reads and how the prompt is built
                "format": t.config.format,
                "text_pair": t.config.text_pair_field is not None,
                # how generation tasks decode and score (predict needs them without the config)
                "generation": t.config.generation.model_dump(),
                "answer_regex": t.config.answer_regex,
                "extract": t.config.extract,
                "normalize": t.config.normalize,
                "head": [rf.head_key(t.name, "weight"), rf.head_key(t.name, "bias")] if encoder else None,
            }
            for t in tasks
        ],
    }


def make_portable(folder: Path, model_cfg) -> None:
    """adapter_config.json: the base id as the config gave it (PEFT records the resolved path) and a task_type."""
    path = folder / rf.ADAPTER_CONFIG
    conf = json.loads(path.read_text())
    conf["base_model_name_or_path"] = model_cfg.name_or_path
    conf["task_type"] = conf.get("task_type") or PEFT_TASK_TYPES[model_cfg.kind]
    path.write_text(jsonio.dumps(conf, indent=2, sort_keys=True))


def find_adapter(path: str | Path) -> Path:
    """RUN_DIR/adapter, or ``path`` itself when it is the adapter directory."""
    path = Path(path)
    adapter = path / rf.ADAPTER if (path / rf.ADAPTER).is_dir() else path
    if not (adapter / rf.ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(
            f"{path} holds no adapter_model.safetensors (give a run's output dir or its adapter/ directory)"
        )
    return adapter


def read_meta(adapter_dir: Path) -> dict:
    path = adapter_dir / rf.TASKS
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterError(f"{adapter_dir} has no tasks.json: not an ortho-lora adapter directory") from None
    except ValueError as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or "model" not in meta:
        raise AdapterError(
            f"{path} does not describe the model (written by an older version): predict and merge need "
            "an adapter saved by this version; `ortho-lora eval CONFIG --adapter ...` still works with it"
        )
    return meta


def load_heads(heads: nn.ModuleList, names: list[str], heads_file: Path) -> None:
    """Copy saved heads into ``heads`` (head i belongs to task names[i]), matched by task name."""
    saved = load_file(str(heads_file))
    with torch.no_grad():
        for n, p in heads.named_parameters():
            i, rest = n.split(".", 1)
            key = rf.head_key(names[int(i)], rest)
            if key not in saved:
                have = sorted({k.split(".")[1] for k in saved})
                raise ValueError(f"{heads_file} has no head for task {names[int(i)]!r} (it has: {have})")
            if saved[key].shape != p.shape:
                raise ValueError(
                    f"{heads_file}: head {key} has shape {tuple(saved[key].shape)}, "
                    f"task {names[int(i)]!r} needs {tuple(p.shape)} (different label set?)"
                )
            p.copy_(saved[key])


def load_adapter_weights(model: nn.Module, names: list[str], adapter_dir: Path) -> None:
    """Into a built model: the adapter's LoRA weights (PEFT safetensors) and its task heads, matched by task name."""
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model.peft_model, load_file(str(adapter_dir / rf.ADAPTER_WEIGHTS)))
    heads_file = adapter_dir / rf.HEADS
    if heads_file.is_file():
        load_heads(model.heads, names, heads_file)


def warm_start(model: nn.Module, names: list[str], folder: str | Path) -> None:
    """train.init_adapter: the LoRA weights of a saved PEFT adapter (shapes must match this run's lora.r and target
    modules), and the task heads of the tasks it has by name; AdapterError naming what does not fit."""
    from peft import set_peft_model_state_dict

    path = Path(folder)
    weights = path / rf.ADAPTER_WEIGHTS
    if not weights.is_file():
        raise AdapterError(f"train.init_adapter: {path} has no {rf.ADAPTER_WEIGHTS} (a PEFT adapter folder)")
    try:
        result = set_peft_model_state_dict(model.peft_model, load_file(str(weights)))
    except RuntimeError as e:
        raise AdapterError(
            f"train.init_adapter: {path} does not fit this run's LoRA (lora.r / target_modules / model): "
            f"{str(e).splitlines()[0]}"
        ) from None
    lora_missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if lora_missing:
        raise AdapterError(
            f"train.init_adapter: {path} has no weights for {len(lora_missing)} LoRA factors of this run, e.g. "
            f"{lora_missing[0]}: the same lora.target_modules are needed"
        )
    heads_file = path / rf.HEADS
    if heads_file.is_file() and getattr(model, "heads", None) is not None:
        saved = load_file(str(heads_file))
        with torch.no_grad():
            for n, p in model.heads.named_parameters():
                i, rest = n.split(".", 1)
                key = rf.head_key(names[int(i)], rest)
                if key in saved and saved[key].shape == p.shape:
                    p.copy_(saved[key])
    log.info("warm start: LoRA weights from %s (a new optimizer)", path)


def spec_from_meta(meta: dict, base: str | None = None):
    """(Config, [TaskData]) rebuilt from tasks.json: what models.build.build_model reads, without any data."""
    model = {k: v for k, v in meta["model"].items() if k in ModelConfig.model_fields}
    if base:
        model["name_or_path"] = base
    tasks = []
    for t in meta["tasks"]:
        given = {
            k: t[k]
            for k in (
                "type",
                "labels",
                "label_words",
                "prompt",
                "metric",
                "answer_regex",
                "extract",
                "normalize",
                "format",
            )
            if t.get(k) is not None
        }
        if isinstance(t.get("generation"), dict):  # absent in older adapters: the defaults
            given["generation"] = GenerationOptions(**t["generation"])
        config = TaskConfig.model_construct(
            name=t["name"], text_pair_field="text_pair" if t.get("text_pair") else None, **given
        )
        tasks.append(TaskData(t["name"], config, labels=t.get("labels")))
    lora = LoraConfigModel(**{k: v for k, v in meta.get("lora", {}).items() if k in LoraConfigModel.model_fields})
    return Config.model_construct(model=ModelConfig(**model), lora=lora, tasks=[t.config for t in tasks]), tasks


def load_adapter_model(adapter_dir: Path, base: str | None = None, device: torch.device | None = None):
    """(model in eval mode, tasks, tokenizer) from the adapter directory alone; ``base`` overrides the recorded base."""

    meta = read_meta(adapter_dir)
    cfg, tasks = spec_from_meta(meta, base)
    tokenizer = load_tokenizer(cfg.model)
    model = build_model(cfg, tasks, tokenizer, adapter_dir=adapter_dir)
    heads = getattr(model, "heads", None)
    if heads is not None:
        heads_file = adapter_dir / rf.HEADS
        if not heads_file.is_file():
            raise AdapterError(f"{adapter_dir} has no heads.safetensors: the encoder's task heads are missing")
        load_heads(heads, [t.name for t in tasks], heads_file)
    if device is not None:
        place_model(model, cfg.model.quantization, device)
    return model.eval(), tasks, tokenizer
