"""The adapter's model card (README.md), built from its tasks.json and, once the run is evaluated, eval.json.

Written with the adapter (metrics pending) and again after the final evaluation, so a run killed in between
shows "not evaluated yet" until ``--resume`` redoes the evaluation.
"""

from __future__ import annotations

import math
from pathlib import Path

from ortho_lora_dist.artifacts.adapter import read_meta
from ortho_lora_dist.runtime import jsonio
from ortho_lora_dist.runtime.fsutil import atomic_write_text
from ortho_lora_dist.runtime.hub import looks_local


def _num(value) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _is_hub_id(name: str) -> bool:
    return not name.startswith("pkg://") and not looks_local(name)


def model_card(meta: dict, evaluation: dict | None = None) -> str:
    m, lora, tc, tasks = meta["model"], meta["lora"], meta["train"], meta["tasks"]
    base, encoder = m["name_or_path"], m["kind"] == "encoder-classification"
    where = "BASE_DIR" if base.startswith("pkg://") else base
    names = [t["name"] for t in tasks]
    splits = [s for s in ("validation", "test") if evaluation and evaluation.get(s)]
    front = [
        "---",
        "library_name: peft",
        *([f"base_model: {base}"] if _is_hub_id(base) else []),
        "tags: [ortho-lora, lora, multi-task]",
        "---",
        "",
    ]
    lines = [
        f"# Multi-task LoRA adapter: {', '.join(names)}",
        "",
        f"One LoRA adapter shared by {len(tasks)} task(s), trained with ortho-lora-dist on `{base}` "
        f"({m['kind']}, dtype {m['dtype']}, quantization {m['quantization']}, max_length {m['max_length']}"
        + (f", {m['pooling']} pooling" if encoder else "")
        + ").",
        "",
        "## Tasks",
        "",
        "| task | type | labels | metric |" + "".join(f" {s} |" for s in splits),
        "|---|---|---|---|" + "---|" * len(splits),
    ]
    for t in tasks:
        labels = ", ".join(t["labels"]) if t["labels"] else "-"
        scores = "".join(f" {_num(evaluation[s].get(t['name']))} |" for s in splits)
        lines.append(f"| {t['name']} | {t['type']} | {labels} | {t['metric']} |{scores}")
    lines += [
        "",
        f"Metrics (loss for metric: loss) from the run's eval.json (step {evaluation.get('step', tc['step'])})."
        if splits
        else "Not evaluated yet: the card is rewritten when the run's final evaluation is done.",
        "",
    ]
    options = f", options `{jsonio.dumps(tc['strategy_options'])}`" if tc["strategy_options"] else ""
    targets = lora["target_modules"] if isinstance(lora["target_modules"], str) else ", ".join(lora["target_modules"])
    lines += [
        "## Method",
        "",
        f"`train.strategy: {tc['strategy']}`{options}, `train.granularity: {tc['granularity']}`: at every step each "
        "task's LoRA gradient is captured (one backward) and the per-task gradients are combined by the strategy, "
        "per LoRA block at this granularity, before the optimizer step.",
        "",
        "| setting | value |",
        "|---|---|",
        f"| lora r / alpha / dropout | {lora['r']} / {lora['alpha']} / {lora['dropout']}"
        + (" (rsLoRA)" if lora.get("use_rslora") else "")
        + " |",
        f"| lora target_modules | {targets} |",
        f"| lr / schedule | {tc['lr']} / {tc['schedule']} |",
        f"| steps | {tc['step']} of {tc['total_steps']} |",
        f"| per_task_batch_size x accumulation | {tc['per_task_batch_size']} x {tc['gradient_accumulation']} |",
        f"| seed | {tc['seed']} |",
        "",
        "## Use it",
        "",
        "```bash",
        "ortho-lora predict ADAPTER_DIR --input records.jsonl --output predictions.jsonl",
        f'#   records.jsonl: one {{"task": "{names[0]}", "text": "..."}} per line',
        "ortho-lora merge ADAPTER_DIR OUT_DIR"
        + ("" if m["quantization"] == "none" else "   # into the base de-quantised to its dtype"),
        "```",
        "",
        "```python",
        "from peft import PeftModel",
        f"from transformers import {'AutoModel' if encoder else 'AutoModelForCausalLM'}",
        "",
        f'base = {"AutoModel" if encoder else "AutoModelForCausalLM"}.from_pretrained("{where}"'
        + (", add_pooling_layer=False)" if encoder else ")"),
        'model = PeftModel.from_pretrained(base, "ADAPTER_DIR")',
        "```",
        "",
    ]
    if base.startswith("pkg://"):
        lines += [
            f"`{base}` names a model directory inside an installed Python package: ortho-lora resolves it; "
            "plain transformers needs that directory's path (BASE_DIR above).",
            "",
        ]
    if encoder:
        lines += [
            "Task heads: `heads.safetensors`, keys `heads.<task>.weight` / `.bias`, "
            f"applied to the {m['pooling']}-pooled "
            "last hidden state; class i is `labels[i]` in tasks.json.",
            "",
        ]
    else:
        lines += [
            "Prompts and label words per task are in tasks.json; classification scores each label word after "
            "the prompt and takes the most likely.",
            "",
        ]
    return "\n".join(front + lines)


def write_model_card(adapter_dir: Path, evaluation: dict | None = None) -> None:
    """README.md from tasks.json (and ``evaluation``: eval.json's content) written atomically."""
    adapter_dir = Path(adapter_dir)
    text = model_card(read_meta(adapter_dir), evaluation)
    atomic_write_text(adapter_dir / "README.md", text)
