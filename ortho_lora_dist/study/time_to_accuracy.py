"""Time to accuracy: how many optimizer steps (and seconds) a method needs to reach joint training's best
validation average, per seed, paired with joint's own; pure functions of the runs' validation curves.

Target (per seed): the best validation average joint training reached at any evaluation of that seed's run.
A method's steps to target: the first evaluated step whose validation average is >= the target (None: never).
Seconds: steps x the method's seconds per optimizer step (median over the seeds' runs, which ``compare``
interleaves, so machine noise falls on every method alike; evaluation time is not counted in it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Curve = list[tuple[int, float]]  # (optimizer step, validation average), increasing steps


def validation_curve(records: Sequence[dict], names: Sequence[str]) -> Curve:
    """The (step, mean validation metric over ``names``) of every evaluation record of a metrics.jsonl."""
    out: dict[int, float] = {}
    for r in records:
        ev = r.get("eval") or {}
        values = [ev.get(n) for n in names]
        if "step" in r and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            out[int(r["step"])] = sum(values) / len(values)
    return sorted(out.items())


def first_reach(curve: Curve, target: float) -> int | None:
    """The first step at which the curve is >= ``target`` (None when it never is)."""
    return next((s for s, v in curve if v >= target), None)


def mean(xs: Sequence[float | None]) -> float:
    """The mean of the finite values (None and NaN skipped); NaN when there are none."""
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def median(xs: Sequence[float]) -> float:
    xs = sorted(x for x in xs if x is not None and math.isfinite(x))
    if not xs:
        return float("nan")
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def time_to_target(
    curves: Sequence[Curve], joint_curves: Sequence[Curve], seconds_per_step: float, joint_seconds_per_step: float
) -> dict:
    """Per seed (the i-th curve of each list): joint's best validation average as the target, the steps and
    seconds this method and joint need to reach it, and their paired differences (seeds where both reach it)."""
    out: dict = {"target": [], "steps": [], "joint_steps": [], "seconds": [], "joint_seconds": []}
    for curve, joint in zip(curves, joint_curves):
        if not joint or not curve:
            continue
        target = max(v for _, v in joint)
        s, sj = first_reach(curve, target), first_reach(joint, target)
        out["target"].append(target)
        out["steps"].append(s)
        out["joint_steps"].append(sj)
        out["seconds"].append(None if s is None else s * seconds_per_step)
        out["joint_seconds"].append(sj * joint_seconds_per_step)
    pairs = [(s, sj) for s, sj in zip(out["steps"], out["joint_steps"]) if s is not None]
    out["reached"] = len(pairs)
    out["seeds"] = len(out["target"])
    out["paired_steps"] = [s - sj for s, sj in pairs]
    out["paired_seconds"] = [a - b for a, b in zip(out["seconds"], out["joint_seconds"]) if a is not None]
    out["speedup"] = [  # joint's seconds / this method's seconds to the same target (> 1: faster)
        b / a for a, b in zip(out["seconds"], out["joint_seconds"]) if a is not None and a > 0
    ]
    return out
