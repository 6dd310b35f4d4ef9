"""The ``zero_shot`` row of ``ortho-lora compare``: the base causal LM, untrained, evaluated like every trained run.

A fresh LoRA adapter is the identity (PEFT initialises lora_B to 0), so the model a run starts from IS the base
model: it is built exactly as training builds it (prompts, chat template, generation settings) and evaluated on
validation and test; ``eval.json`` is written atomically, so a finished row is reused by the next compare.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ortho_lora_dist.config import Config, eval_batch_size
from ortho_lora_dist.data.loading import load_tasks
from ortho_lora_dist.evaluation.evaluate import run_final_eval
from ortho_lora_dist.evaluation.report import eval_document
from ortho_lora_dist.models.build import load_run_model
from ortho_lora_dist.runtime import jsonio
from ortho_lora_dist.runtime import run_files as rf
from ortho_lora_dist.runtime.distributed import init_distributed
from ortho_lora_dist.runtime.fsutil import atomic_write_text


def check_zero_shot(cfg: Config) -> None:
    """A zero-shot row needs a causal LM: an encoder's task heads start random (ValueError naming the key)."""
    if cfg.model.kind != "causal-lm":
        raise ValueError("compare: zero_shot needs model.kind: causal-lm (an encoder's task heads start untrained)")


def evaluate_zero_shot(cfg: Config) -> Path:
    """OUTPUT_DIR/eval.json of the untrained model of ``cfg`` (causal LM only); kept if already there."""
    out = Path(cfg.output_dir)
    if (out / rf.EVAL).is_file():
        return out / rf.EVAL
    check_zero_shot(cfg)
    tasks = load_tasks(cfg.tasks)
    info = init_distributed(cfg.distributed.backend, deepspeed=False)
    torch.manual_seed(cfg.train.seed)
    model = load_run_model(cfg, tasks, info.device, info.world).eval()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    if any(bool(p.abs().sum() > 0) for p in lora_b):
        raise RuntimeError("zero_shot: the fresh adapter is not the identity (a lora_B factor is non-zero)")
    full = run_final_eval(model, tasks, info, eval_batch_size(cfg))
    if info.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / rf.EVAL, jsonio.dumps(eval_document({"step": 0}, full), indent=1))
    return out / rf.EVAL
