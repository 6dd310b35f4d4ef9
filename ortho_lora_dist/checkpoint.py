"""Checkpoints: ``checkpoints/step-N/`` written atomically (temp dir + rename), resumed from the latest
complete one. Nothing is unpickled: tensors in safetensors, optimizer state with torch.load(weights_only=True),
the rest JSON. A checkpoint is complete when its ``trainer_state.json`` (written last) is present.

  adapter/               PEFT adapter (PeftModel.from_pretrained loads it)
  heads.safetensors      task heads (encoder-classification)
  optimizer.pt           optimizer + scheduler state (torch engines; DeepSpeed writes deepspeed/ instead)
  rng.safetensors        torch RNG state and the task-order generator state
  trainer_state.json     step, sampler positions, skip counter, config
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE = "trainer_state.json"


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    found = [p for p in root.glob("step-*") if re.fullmatch(r"step-\d+", p.name) and (p / STATE).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = checkpoint_dirs(output_dir)
    return found[-1] if found else None


def staging_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f".step-{step}.tmp"


def save_rng(path: Path, order_state: torch.Tensor) -> None:
    save_file({"torch": torch.get_rng_state(), "order": order_state.contiguous()}, str(path))


def load_rng(path: Path) -> torch.Tensor:
    state = load_file(str(path))
    torch.set_rng_state(state["torch"])
    return state["order"]


def write_state(tmp: Path, state: dict) -> None:
    (tmp / STATE).write_text(json.dumps(state, indent=1))


def publish(tmp: Path, step: int, keep: int | None = None) -> Path:
    """Rename the staging dir to checkpoints/step-N (atomic on one file system); prune old ones."""
    final = tmp.parent / f"step-{step}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep:
        for old in checkpoint_dirs(tmp.parent.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_torch_state(path: Path, state: dict) -> None:
    torch.save(state, path)


def load_torch_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
