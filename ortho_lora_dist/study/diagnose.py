"""``ortho-lora diagnose CONFIG``: before paying for a multi-task rule, a short joint run on the user's own config and
data that separates each task's gradient signal from its noise (core/noise.py) and says what a rule could act on.

Every step captures each task's two halves apart (2T groups, ONE backward, joint training: the update is joint's),
reduced across ranks as any run; the window's estimates give per task the signal share and the noise scale B_t,
per pair the debiased conflict C_st with a bootstrap CI. Written to OUTPUT_DIR-diagnose/diagnose.json (strict JSON)
and printed with the verdict.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from ortho_lora_dist.config import Config
from ortho_lora_dist.core.noise import step_estimates, summarise
from ortho_lora_dist.runtime import jsonio
from ortho_lora_dist.runtime.fsutil import atomic_write_text
from ortho_lora_dist.runtime.progress import progress

log = logging.getLogger("ortho_lora_dist")
NOISY = 10.0  # B_t above this many times the step's samples of the task: its gradient is mostly noise


def diagnose_config(cfg: Config, steps: int) -> Config:
    """The diagnose run's config: joint, unpacked (halves are split by rows), ``steps`` steps, no checkpoints,
    trackers or plots, in OUTPUT_DIR-diagnose."""
    train = cfg.train.model_copy(
        update={
            "strategy": "joint",
            "strategy_options": {},
            "gram": "raw",
            "packing": False,
            "steps": steps,
            "epochs": None,
            "checkpoint_every": 0,
            "eval_every": 0,
            "report_to": [],
            "plots": False,
        }
    )
    return cfg.model_copy(update={"train": train, "output_dir": f"{cfg.output_dir.rstrip('/')}-diagnose"})


def verdict(report: dict, names: list[str]) -> list[str]:
    """What a user can act on, one line each."""
    lines = []
    lo, hi = report["conflict_ci"]
    pairs = [(s, t) for s in range(len(names)) for t in range(s + 1, len(names))]
    conflicts = [(s, t) for s, t in pairs if hi[s][t] < 0]
    for s, t in pairs:
        c = report["conflict"][s][t]
        if not math.isfinite(c):
            lines.append(
                f"{names[s]} vs {names[t]}: C undefined: a task's summed signal estimate is <= 0 over the window "
                "(its gradient is noise at this batch): run more --steps"
            )
            continue
        kind = "CONFLICT" if hi[s][t] < 0 else "aligned" if lo[s][t] > 0 else "no conflict distinguishable from noise"
        lines.append(f"{names[s]} vs {names[t]}: C = {c:+.3f} (95% CI {lo[s][t]:+.3f} to {hi[s][t]:+.3f}): {kind}")
    for t, name in enumerate(names):
        b, n = report["noise_scale"][t], report["samples_per_step"][t]
        share, raw = report["signal_share"][t], report["raw_share"][t]
        noisy = not math.isfinite(b) or b > NOISY * n
        lines.append(
            f"{name}: signal share {share:.0%} (raw squared-norm share {raw:.0%}); noise scale B = "
            + (f"{b:,.0f}" if math.isfinite(b) else "inf (no signal measured)")
            + f" samples vs {n:.0f} per step"
            + (
                ": mostly noise at this batch; more samples of it per step (ranks, accumulation) pay up to ~B"
                if noisy
                else ""
            )
        )
    if conflicts:
        which = ", ".join(f"{names[s]}/{names[t]}" for s, t in conflicts)
        lines.append(
            f"verdict: true conflict between {which}: a projection rule (ortho, pcgrad) has something to act on; "
            "measure it against joint before paying: ortho-lora compare CONFIG --methods joint,ortho-factor"
        )
    else:
        lines.append(
            "verdict: no pair of tasks conflicts beyond noise: a projection rule has nothing to act on, train joint; "
            "magnitude rules (norm_balance, imtl_g) equalise the raw norms, which mix noise: compare the signal "
            "shares above before trying one"
        )
    return lines


def diagnose(cfg: Config, steps: int = 30) -> dict:
    """Run the diagnose window; returns the report (rank 0 writes it)."""
    from ortho_lora_dist.training.recipe import Trainer

    run_cfg = diagnose_config(cfg, steps)
    trainer = Trainer(run_cfg, halves=True)
    names = trainer.names
    try:
        estimates, samples = [], []
        bar = progress(total=steps, enabled=trainer.info.main, desc="diagnose")
        for _ in range(steps):
            result, _ = trainer.train_step()
            tokens, group_samples = trainer.group_counts
            estimates.append(step_estimates(result.group_grams.sum(0), tokens, group_samples))
            samples.append(group_samples.view(-1, 2).sum(1))
            bar.update(1)
        bar.close()
    finally:
        trainer.cleanup()
    report = summarise(estimates, torch.stack(samples).double().mean(0), seed=cfg.train.seed)
    report["task_names"] = names
    report["verdict"] = verdict(report, names)
    if trainer.info.main:
        out = Path(run_cfg.output_dir) / "diagnose.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, jsonio.dumps(report, indent=1))
        report["written"] = str(out)
    return report
