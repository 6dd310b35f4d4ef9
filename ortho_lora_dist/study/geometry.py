"""The geometry of a run's task gradients, as ``docs/methods.md`` reads it to choose a rule: how aligned the
tasks are (mean pairwise cosine of the per-task LoRA gradients, over all blocks and over the lora_A / lora_B
blocks alone) and how the squared gradient norm splits between tasks (share_t = ||g_t||^2 / sum_s ||g_s||^2),
averaged over the logged steps of a metrics.jsonl, then over seeds."""

from __future__ import annotations

from collections.abc import Sequence

from ortho_lora_dist.study.time_to_accuracy import mean as _mean

COSINES = ("all", "A", "B")


def run_geometry(steps: Sequence[dict], names: Sequence[str]) -> dict | None:
    """Mean cosine/{all,A,B} and mean share per task over the logged steps; None when nothing was logged
    (one task, or a loss-only strategy without per-task gradients)."""
    if not any("share" in r for r in steps):
        return None
    return {
        "cosine": {k: _mean([r.get(f"cosine/{k}") for r in steps]) for k in COSINES},
        "share": {n: _mean([r.get("share", {}).get(n) for r in steps]) for n in names},
    }


def mean_geometry(per_seed: Sequence[dict | None]) -> dict | None:
    """The seeds' geometries averaged (None when any seed has none)."""
    if not per_seed or any(g is None for g in per_seed):
        return None
    return {
        "cosine": {k: _mean([g["cosine"][k] for g in per_seed]) for k in COSINES},
        "share": {n: _mean([g["share"][n] for g in per_seed]) for n in per_seed[0]["share"]},
    }


def describe(geometry: dict, who: str = "joint") -> str:
    """One line of compare.md: cosines and the squared-norm shares, largest first."""
    cos = geometry["cosine"]
    shares = sorted(geometry["share"].items(), key=lambda kv: -kv[1])
    fair = 1 / len(shares)
    return (
        f"\n{who}'s task gradients (mean over logged steps and seeds): pairwise cosine {cos['all']:+.3f} "
        f"(lora_A {cos['A']:+.3f}, lora_B {cos['B']:+.3f}); share of the squared norm "
        + ", ".join(f"{n} {100 * s:.0f}%" for n, s in shares)
        + f" (fair share {100 * fair:.0f}%; docs/methods.md, 'What to try first', reads these).\n"
    )
