"""compare.png: the per-task bars of every method and, when the runs validated along the way, their mean
validation curves, one colour per method in both panels."""

from __future__ import annotations

from pathlib import Path


def plot(summary: dict, path: Path) -> None:
    """compare.png: per-task bars (mean, 95% CI) and, when evaluated along the way, the validation curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    scored = summary.get("scored", summary["tasks"])
    label = "average" if scored == summary["tasks"] else f"average ({', '.join(scored)})"
    names = summary["tasks"] + [label]
    methods = list(summary["methods"])
    curves = {m: e["curve"] for m, e in summary["methods"].items() if e.get("curve")}
    color = {m: f"C{i % 10}" for i, m in enumerate(methods)}  # one colour per method in both panels
    x = np.arange(len(names))
    width = 0.8 / len(methods)
    bar_width = max(7, 1.6 * len(names))
    fig, axes = plt.subplots(1, 2 if curves else 1, figsize=(bar_width + (6 if curves else 0), 4), squeeze=False)
    ax = axes[0][0]
    for i, m in enumerate(methods):
        e = summary["methods"][m]
        means = [e["per_task"][n]["mean"] for n in summary["tasks"]] + [e["average"]["mean"]]
        errs = [e["per_task"][n]["ci95"] for n in summary["tasks"]] + [e["average"]["ci95"]]
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, means, width, yerr=errs, capsize=3, label=m, color=color[m])
    ax.set_xticks(x, names)
    lo = min(summary["methods"][m]["per_task"][n]["mean"] for m in methods for n in summary["tasks"])
    ax.set_ylim(max(0.0, lo - 0.1), 1.0)
    ax.set_ylabel(f"{summary['split']} metric")
    ax.set_title(f"Per-task metric, {summary['seeds']} seeds (95% CI)")
    ax.legend(fontsize=8, ncol=min(len(methods), 4))
    if curves:
        cv = axes[0][1]
        for m, curve in curves.items():
            steps, values = zip(*curve)
            cv.plot(steps, values, marker=".", label=m, color=color[m], linewidth=2.5 if m == "joint" else 1.2)
        targets = [tt for e in summary["methods"].values() if (tt := e.get("time_to_target"))]
        if targets:
            target = sum(targets[0]["target"]) / len(targets[0]["target"])
            cv.axhline(target, color="grey", linestyle=":", label="joint's best (mean target)")
        cv.set_xlabel("optimizer step")
        cv.set_ylabel("validation average")
        cv.set_title(f"Validation average during training (mean of {summary['seeds']} seeds)")
        cv.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
