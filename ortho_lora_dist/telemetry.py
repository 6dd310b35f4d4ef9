"""Run telemetry (rank 0): metrics.jsonl (one JSON object per logged step), conflicts.jsonl (per-block
conflict rate per logged step, for the heat map) and TensorBoard events."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .fsutil import atomic_write_text

from .step import StepResult


def block_summary(result: StepResult, kinds: list[str]) -> dict:
    """Conflict rate and mean pairwise cosine per block group: lora_A blocks, lora_B blocks, all."""
    out = {}
    groups = {"A": [i for i, k in enumerate(kinds) if k == "A"], "B": [i for i, k in enumerate(kinds) if k == "B"]}
    groups["all"] = list(range(len(kinds)))
    for name, idx in groups.items():
        if idx:
            sel = torch.tensor(idx)
            out[f"conflict_rate/{name}"] = float(result.conflict_rate[sel].mean())
            out[f"cosine/{name}"] = float(result.mean_cosine[sel].mean())
    return out


def _keep_until(path: Path, step: int) -> None:
    """Drop records logged after ``step`` (written after the checkpoint a run resumes from), atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:  # a line cut by a kill
            continue
    atomic_write_text(path, "".join(x + "\n" for x in kept))


class Telemetry:
    """``resume_step``: None for a new run (files start empty); else the step resumed from (later records dropped)."""

    def __init__(self, output_dir: str | Path, task_names: list[str], enabled: bool, resume_step: int | None = None) -> None:
        self.enabled, self.task_names = enabled, task_names
        self.dir = Path(output_dir)
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            for name in ("metrics.jsonl", "conflicts.jsonl"):
                _keep_until(self.dir / name, resume_step)
        mode = "a" if resume_step is not None else "w"
        self.metrics = (self.dir / "metrics.jsonl").open(mode)
        self.conflicts = (self.dir / "conflicts.jsonl").open(mode)
        from torch.utils.tensorboard import SummaryWriter

        purge = resume_step + 1 if resume_step is not None else None  # TensorBoard hides events after the resume point
        self.tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=purge)

    def log(self, record: dict, blocks: dict | None = None) -> None:
        """One metrics.jsonl line (+ TensorBoard scalars); ``blocks``: per-block data for conflicts.jsonl."""
        if not self.enabled:
            return
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if blocks is not None:
            self.conflicts.write(json.dumps({"step": record["step"], **blocks}) + "\n")
            self.conflicts.flush()
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                self.tb.add_scalar(key, value, record["step"])
            elif isinstance(value, dict):
                for sub, v in value.items():
                    if isinstance(v, (int, float)):
                        self.tb.add_scalar(f"{key}/{sub}", v, record["step"])

    def close(self) -> None:
        if self.enabled and not self.metrics.closed:
            self.metrics.close()
            self.conflicts.close()
            self.tb.close()
