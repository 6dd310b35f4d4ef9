"""compare.md: the table of ``compare``'s summary (per-task metrics, average, paired differences vs joint, gap
recovered, validation average, leverage, time) and the time-to-accuracy table under it."""

from __future__ import annotations

import math

from ortho_lora_dist.study.geometry import describe


def _pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f}%"


def _num(x, fmt: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def to_markdown(summary: dict) -> str:
    names = summary["tasks"]
    scored = summary.get("scored", names)
    cols = [
        *names,
        "average",
        "paired diff vs joint (95% CI, seeds > 0)",
        "gap recovered",
        "validation avg",
        "change vs joint",
        "cos(joint)",
        "neg. gain",
        "time / joint",
    ]
    head = "| method | " + " | ".join(cols) + " |\n" + "|---" * (len(cols) + 1) + "|\n"
    rows = []
    for m, e in summary["methods"].items():
        cells = [f"{100 * e['per_task'][n]['mean']:.1f} ± {100 * e['per_task'][n]['ci95']:.1f}" for n in names]
        cells.append(f"{100 * e['average']['mean']:.2f} ± {100 * e['average']['ci95']:.2f}")
        p = e.get("paired_vs_joint")
        cells.append(
            f"{100 * p['mean']:+.2f} ({100 * (p['mean'] - p['ci95']):+.2f}, {100 * (p['mean'] + p['ci95']):+.2f}), "
            f"{p['positive']}/{len(p['per_seed'])}"
            if p
            else "-"
        )
        cells.append(_pct(e.get("gap_recovery", {}).get("average")))
        cells.append(
            _num(100 * e["validation_average"] if e["validation_average"] == e["validation_average"] else None, ".2f")
        )
        cells += [
            _num(e["change"]),
            _num(e["cos_joint"]),
            _pct(e["negative_gain"]),
            f"{e['time_vs_joint']:.2f}x" if "time_vs_joint" in e else "-",
        ]
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    note = (
        f"\n{summary['seeds']} seeds; metrics x100, mean ± 95% CI (Student t) on the {summary['split']} split; "
        + (f"average = {', '.join(scored)} only (--score); " if scored != names else "")
        + "paired diff = per-seed (method - joint) of the average; neg. gain = share of task-steps whose "
        "first-order gain g_t . combined was < 0.\n"
    )
    if "lossweights" in summary:
        lw = summary["lossweights"]
        note += (
            "\nlossweights grid (seed 0, validation average): "
            + ", ".join(f"{g['tag']} {100 * g['validation_average']:.2f}" for g in lw["grid"])
            + f"; chosen: {lw['chosen']['tag']}.\n"
        )
    if geometry := summary["methods"].get("joint", {}).get("geometry"):
        note += describe(geometry)
    return head + "\n".join(rows) + "\n" + note + _time_table(summary)


def _time_table(summary: dict) -> str:
    """Time to accuracy: steps / seconds to joint's best validation average (per seed), paired with joint."""
    rows = [(m, e["time_to_target"]) for m, e in summary["methods"].items() if "time_to_target" in e]
    if not rows:
        return ""
    out = [
        "\n| method | reached target | steps to target (mean) | paired steps vs joint (95% CI) "
        "| seconds to target vs joint (95% CI) | speed-up vs joint (median) |",
        "|---|---|---|---|---|---|",
    ]

    def ci(mean, half, unit=""):
        return "-" if mean is None else f"{mean:+.1f}{unit} ({mean - half:+.1f}, {mean + half:+.1f})"

    for m, tt in rows:
        steps = ci(tt["paired_steps_mean"], tt["paired_steps_ci95"])
        seconds = ci(tt["paired_seconds_mean"], tt["paired_seconds_ci95"], " s")
        out.append(
            f"| {m} | {tt['reached']}/{tt['seeds']} | {_num(tt['steps_mean'], '.1f')} | {steps} | {seconds} "
            f"| {_num(tt['speedup_median'], '.2f')}x |"
        )
    target = [x for _, tt in rows for x in tt["target"]][: summary["seeds"]]
    return (
        "\n".join(out)
        + f"\n\ntarget per seed: joint's best validation average ({', '.join(f'{100 * x:.2f}' for x in target)}); "
        "steps: the first evaluation at or above it; seconds: steps x the method's median seconds per step "
        "(evaluation excluded); paired over the seeds where the method reached the target.\n"
    )
