"""Writing the self-describing adapter folder: PEFT's files, the task heads, tasks.json and the model card."""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from ortho_lora_dist.artifacts.adapter import describe, make_portable
from ortho_lora_dist.artifacts.card import write_model_card
from ortho_lora_dist.config import Config
from ortho_lora_dist.data.loading import TaskData
from ortho_lora_dist.runtime import jsonio
from ortho_lora_dist.runtime import run_files as rf
from ortho_lora_dist.runtime.fsutil import replace_dir


def save_adapter(
    where: Path, model: nn.Module, cfg: Config, tasks: list[TaskData], step: int, total_steps: int, atomic: bool = False
) -> Path:
    """``where/adapter``: PEFT format + task heads keyed by task name + tasks.json + README.md (call on rank 0).

    ``atomic``: written to a staging folder and renamed over ``where/adapter``, so a kill never leaves half an adapter.
    """
    where.mkdir(parents=True, exist_ok=True)
    target = where / rf.ADAPTER
    folder = where / f".{rf.ADAPTER}.tmp" if atomic else target
    if atomic:
        shutil.rmtree(folder, ignore_errors=True)
    peft = model.peft_model
    # only the (replicated) LoRA tensors: model.state_dict() would run FSDP's collective hooks on rank 0 alone
    trainable = {n: p.detach() for n, p in peft.named_parameters() if p.requires_grad}
    peft.save_pretrained(str(folder), state_dict=trainable)
    heads = getattr(model, "heads", None)
    if heads is not None:
        names = [t.name for t in tasks]
        tensors = {
            rf.head_key(names[int(i)], rest): p.detach().cpu().contiguous()
            for n, p in heads.named_parameters()
            for i, rest in [n.split(".", 1)]
        }
        save_file(tensors, str(folder / rf.HEADS))
    # self-describing: predict / merge need this folder alone (adapter.py lists the files)
    (folder / rf.TASKS).write_text(jsonio.dumps(describe(cfg, tasks, step, total_steps), indent=1))
    make_portable(folder, cfg.model)
    write_model_card(folder)  # metrics pending; the recipe rewrites it after eval.json
    if atomic:
        replace_dir(folder, target)
    return target
