"""PNG plots of a run (matplotlib, Agg):

loss.png       training loss per task (solid), validation loss per task (dotted, same colour, when evaluated
               with train.eval_every) and the learning rate (dashed black, right axis); validation metrics in a
               second panel when evaluated
leverage.png   ||combined - joint|| / ||joint||, cos(combined, joint), and each task's first-order gain
conflicts.png  the conflict map: LoRA layers (module names) x task pairs, mean cosine of the two tasks'
               gradients over the logged steps, lora_A and lora_B blocks in separate panels
"""

from __future__ import annotations

import json
import re
from pathlib import Path


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (is this an ortho-lora output directory?)")
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line cut by a kill
            continue
    return out


def _short(name: str) -> str:
    """'base_model.model.model.layers.3.self_attn.q_proj' -> 'layers.3.self_attn.q_proj'."""
    m = re.search(r"(layers?|layer|h|blocks?)\.\d+\..*", name)
    return m.group(0) if m else name.removeprefix("base_model.model.")


def plot_run(output_dir: str | Path) -> list[Path]:
    """Write loss.png, leverage.png and conflicts.png (when their data exist) into output_dir; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out = Path(output_dir)
    all_records = _read_jsonl(out / "metrics.jsonl")
    records = [r for r in all_records if "loss" in r]
    if not records:
        raise ValueError(f"{out / 'metrics.jsonl'} has no logged training steps")
    evals = [r for r in all_records if "eval" in r and r["eval"]]
    eval_losses = [r for r in all_records if r.get("eval_loss")]
    written = []
    steps = [r["step"] for r in records]

    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(12 if evals else 7, 4), squeeze=False)
    ax = axes[0, 0]
    for task in records[0]["loss"]:
        (line,) = ax.plot(steps, [r["loss"][task] for r in records], label=task)
        pts = [(r["step"], r["eval_loss"][task]) for r in eval_losses if r["eval_loss"].get(task) is not None]
        if pts:
            ax.plot(*zip(*pts), ":", marker="o", ms=3, color=line.get_color(), label=f"{task} (validation)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(
        "Loss per task: training (solid), validation (dotted); dashed: learning rate"
        if eval_losses
        else "Loss per task (dashed: learning rate)",
        fontsize=10,
    )
    ax.legend(loc="upper right")
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in records], "k--", lw=0.8)
    lr_ax.set_ylabel("learning rate")
    if evals:
        ax = axes[0, 1]
        for task in [k for k in evals[-1]["eval"] if k != "average"]:
            pts = [(r["step"], r["eval"].get(task)) for r in evals if r["eval"].get(task) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=task)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("validation metric")
        ax.set_title("Validation per task")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)
    written.append(out / "loss.png")

    if "leverage/change" in records[0]:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
        a1.plot(steps, [r["leverage/change"] for r in records], label="||combined - joint|| / ||joint||")
        a1.plot(steps, [r["leverage/cos_joint"] for r in records], label="cos(combined, joint)")
        a1.set_xlabel("optimizer step")
        a1.set_title("How much the rule changes the update")
        a1.legend()
        for task in records[0]["gain"]:
            a2.plot(steps, [r["gain"][task] for r in records], label=task)
        a2.axhline(0, color="k", lw=0.6)
        a2.set_xlabel("optimizer step")
        a2.set_title("First-order gain g_t . combined / ||g_t||^2 (< 0: task pushed back)")
        a2.legend()
        fig.tight_layout()
        fig.savefig(out / "leverage.png", dpi=120)
        plt.close(fig)
        written.append(out / "leverage.png")

    blocks_file = out / "blocks.json"
    conflicts = (
        [c for c in _read_jsonl(out / "conflicts.jsonl") if "cos_pairs" in c]
        if (out / "conflicts.jsonl").is_file()
        else []
    )
    if conflicts and blocks_file.is_file():
        meta = json.loads(blocks_file.read_text())
        cos = np.array([c["cos_pairs"] for c in conflicts]).mean(0)  # [B, P]
        kinds, names, pairs = meta["kinds"], meta["names"], meta["pairs"]
        panels = [(k, [i for i, kind in enumerate(kinds) if kind == k]) for k in ("A", "B", "AB")]
        panels = [(k, idx) for k, idx in panels if idx]
        if len(pairs) and panels and len(names) > 1:
            height = max(3.0, 0.18 * max(len(idx) for _, idx in panels) + 1.5)
            fig, axes = plt.subplots(
                1, len(panels), figsize=(3 + 2.2 * len(panels) + 0.35 * len(pairs) * len(panels), height), squeeze=False
            )
            lim = max(float(np.abs(cos).max()), 1e-6)
            for k, (ax, (kind, idx)) in enumerate(zip(axes[0], panels)):
                im = ax.imshow(cos[idx], aspect="auto", interpolation="nearest", cmap="RdBu", vmin=-lim, vmax=lim)
                labels = [_short(re.sub(r"\.lora_[AB]$", "", names[i])) for i in idx]
                ax.set_yticks(
                    range(len(idx)), labels if k == 0 else [""] * len(idx), fontsize=6
                )  # same rows in every panel
                ax.set_xticks(range(len(pairs)), [f"{a}\n{b}" for a, b in pairs], fontsize=7)
                ax.set_title({"A": "lora_A", "B": "lora_B", "AB": "lora_A + lora_B"}[kind])
            fig.colorbar(im, ax=axes[0].tolist(), label="mean cos(g_i, g_j) over logged steps (< 0: conflict)")
            fig.suptitle(f"Conflict map: {len(conflicts)} logged steps, {meta['granularity']} blocks", y=1.04)
            fig.savefig(out / "conflicts.png", dpi=120, bbox_inches="tight")
            plt.close(fig)
            written.append(out / "conflicts.png")
    return written
