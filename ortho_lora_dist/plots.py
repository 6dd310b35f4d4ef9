"""PNG plots of a run: loss per task over steps, and the conflict heat map (blocks x steps)."""

from __future__ import annotations

import json
from pathlib import Path


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (is this an ortho-lora output directory?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(output_dir: str | Path) -> list[Path]:
    """Write loss.png and conflicts.png into output_dir; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out = Path(output_dir)
    records = [r for r in _read_jsonl(out / "metrics.jsonl") if "loss" in r]
    if not records:
        raise ValueError(f"{out / 'metrics.jsonl'} has no logged training steps")
    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in records]
    for task in records[0]["loss"]:
        ax.plot(steps, [r["loss"][task] for r in records], label=task)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("Loss per task")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)
    written.append(out / "loss.png")

    conflicts = _read_jsonl(out / "conflicts.jsonl") if (out / "conflicts.jsonl").is_file() else []
    if conflicts:
        grid = np.array([c["conflict"] for c in conflicts]).T  # blocks x logged steps
        fig, ax = plt.subplots(figsize=(8, 5))
        im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="magma", vmin=0, vmax=1,
                       extent=(conflicts[0]["step"], conflicts[-1]["step"], grid.shape[0], 0))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("block (LoRA factor, in model order)")
        ax.set_title("Fraction of task pairs in conflict (g_i . g_j < 0)")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(out / "conflicts.png", dpi=120)
        plt.close(fig)
        written.append(out / "conflicts.png")
    return written
