"""``ortho-lora compare``: single-task vs joint vs Ortho-LoRA (factor, module) vs flat PCGrad, over seeds.

Every method runs with the same config, budget (optimizer steps), data order and seeds; only the
gradient combination differs. Single-task trains one adapter per task with that task alone, for the
same number of steps. Metrics come from the test split when the tasks have one (validation otherwise):
nothing is tuned on test. Finished runs (finished.json present) are not redone, so an interrupted
comparison resumes where it stopped.

Reported per method: per-task metric mean and 95% confidence interval across seeds (Student t),
their average, the paper's gap recovery (ortho - joint) / (single - joint) per task and on average,
the mean conflict rate (fraction of task pairs with g_i . g_j < 0 over blocks and logged steps),
and seconds per step relative to joint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .config import Config

METHODS = {
    "single": {},
    "joint": {"strategy": "joint"},
    "ortho-factor": {"strategy": "ortho", "granularity": "factor"},
    "ortho-module": {"strategy": "ortho", "granularity": "module"},
    "pcgrad-global": {"strategy": "ortho", "granularity": "global"},
}


def _variant(cfg: Config, method: str, seed: int, out: Path, task: int | None = None) -> Config:
    tree = cfg.model_dump()
    tree["train"].update(METHODS[method], seed=seed, plots=False)
    if task is not None:
        tree["tasks"] = [tree["tasks"][task]]
    tree["output_dir"] = str(out)
    return Config.model_validate(tree)


def _run(cfg: Config) -> dict:
    from .trainer import Trainer

    out = Path(cfg.output_dir)
    if not (out / "finished.json").is_file():
        Trainer(cfg, resume=True).train()
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in records if "loss" in r]
    ev = json.loads((out / "eval.json").read_text())
    split = "test" if "test" in ev else "validation"
    return {
        "metrics": {k: v for k, v in ev[split].items() if k != "average"},
        "split": split,
        "seconds_per_step": sum(r["seconds_per_step"] for r in steps) / max(len(steps), 1),
        "conflict_rate": sum(r.get("conflict_rate/all", 0.0) for r in steps) / max(len(steps), 1),
    }


def _ci95(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% Student-t interval (0 for one value)."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n))


def compare(cfg: Config, seeds: int, out_dir: str | Path, methods: list[str] | None = None) -> dict:
    methods = methods or list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    out = Path(out_dir)
    names = [t.name for t in cfg.tasks]
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in range(seeds):
        for m in methods:
            if m == "single":
                parts = [_run(_variant(cfg, m, seed, out / "runs" / m / f"seed{seed}" / n, t)) for t, n in enumerate(names)]
                runs[m].append({
                    "metrics": {k: v for p in parts for k, v in p["metrics"].items()}, "split": parts[0]["split"],
                    "seconds_per_step": sum(p["seconds_per_step"] for p in parts), "conflict_rate": float("nan"),
                })
            else:
                runs[m].append(_run(_variant(cfg, m, seed, out / "runs" / m / f"seed{seed}")))
    summary: dict = {"seeds": seeds, "split": runs[methods[0]][0]["split"], "tasks": names, "methods": {}}
    joint_time = sum(r["seconds_per_step"] for r in runs["joint"]) / seeds if "joint" in runs else None
    for m in methods:
        per_task = {n: _ci95([r["metrics"][n] for r in runs[m]]) for n in names}
        avg = _ci95([sum(r["metrics"][n] for n in names) / len(names) for r in runs[m]])
        entry = {
            "per_task": {n: {"mean": v[0], "ci95": v[1]} for n, v in per_task.items()},
            "average": {"mean": avg[0], "ci95": avg[1]},
            "conflict_rate": sum(r["conflict_rate"] for r in runs[m]) / seeds,
            "seconds_per_step": sum(r["seconds_per_step"] for r in runs[m]) / seeds,
        }
        if joint_time:
            entry["time_vs_joint"] = entry["seconds_per_step"] / joint_time
        summary["methods"][m] = entry
    if "single" in runs and "joint" in runs:
        s, j = summary["methods"]["single"], summary["methods"]["joint"]
        for m in methods:
            if m in ("single", "joint"):
                continue
            e = summary["methods"][m]
            rec = {}
            for n in names:
                gap = s["per_task"][n]["mean"] - j["per_task"][n]["mean"]
                rec[n] = (e["per_task"][n]["mean"] - j["per_task"][n]["mean"]) / gap if abs(gap) > 1e-12 else float("nan")
            gap = s["average"]["mean"] - j["average"]["mean"]
            rec["average"] = (e["average"]["mean"] - j["average"]["mean"]) / gap if abs(gap) > 1e-12 else float("nan")
            e["gap_recovery"] = rec
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(summary, indent=1))
    (out / "compare.md").write_text(to_markdown(summary))
    plot(summary, out / "compare.png")
    return summary


def to_markdown(summary: dict) -> str:
    names = summary["tasks"]
    head = "| method | " + " | ".join(names) + " | average | gap recovered (avg) | conflict rate | time / joint |\n"
    head += "|---" * (len(names) + 5) + "|\n"
    rows = []
    for m, e in summary["methods"].items():
        cells = [f"{e['per_task'][n]['mean']:.4f} ± {e['per_task'][n]['ci95']:.4f}" for n in names]
        rec = e.get("gap_recovery", {}).get("average")
        conflict = e["conflict_rate"]
        rows.append(
            f"| {m} | " + " | ".join(cells) + f" | {e['average']['mean']:.4f} ± {e['average']['ci95']:.4f} | "
            + (f"{100 * rec:.0f}%" if rec is not None and not math.isnan(rec) else "-") + " | "
            + ("-" if math.isnan(conflict) else f"{conflict:.3f}") + " | "
            + (f"{e['time_vs_joint']:.2f}x" if "time_vs_joint" in e else "-") + " |"
        )
    note = f"\n{summary['seeds']} seeds; mean ± 95% CI (Student t) on the {summary['split']} split.\n"
    return head + "\n".join(rows) + "\n" + note


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = summary["tasks"] + ["average"]
    methods = list(summary["methods"])
    x = np.arange(len(names))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(names)), 4))
    for i, m in enumerate(methods):
        e = summary["methods"][m]
        means = [e["per_task"][n]["mean"] for n in summary["tasks"]] + [e["average"]["mean"]]
        errs = [e["per_task"][n]["ci95"] for n in summary["tasks"]] + [e["average"]["ci95"]]
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, means, width, yerr=errs, capsize=3, label=m)
    ax.set_xticks(x, names)
    lo = min(summary["methods"][m]["per_task"][n]["mean"] for m in methods for n in summary["tasks"])
    ax.set_ylim(max(0.0, lo - 0.1), 1.0)
    ax.set_ylabel(f"{summary['split']} metric")
    ax.set_title(f"Per-task metric, {summary['seeds']} seeds (95% CI)")
    ax.legend(fontsize=8, ncol=len(methods))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
