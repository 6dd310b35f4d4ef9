"""Controlled-conflict benchmark: how the gain of Ortho-LoRA over joint training moves with conflict.

Two regression tasks share one LoRA adapter on a frozen random MLP (8-d input plus a one-hot task
indicator, so a shared adapter CAN fit both). Task 0's target is tanh(w0 . x); task 1's is
tanh(w1 . x) with w1 = cos(theta) w0 + sin(theta) w_perp. theta is the knob: 0 deg = the same task,
90 deg = unrelated, 180 deg = opposite. Same steps, data and seeds for single-task (one adapter per
task), joint and Ortho-LoRA (factor); reported: final test MSE per task (mean over seeds), the
measured conflict rate, and ortho's gain = joint MSE - ortho MSE (positive: ortho better).

    python bench/conflict_knob.py --out runs/conflict-knob
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from torch import nn

D, H, STEPS, BATCH, LR = 8, 64, 300, 64, 3e-2


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(D + 2, H), nn.Linear(H, H), nn.Linear(H, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.fc2(torch.tanh(self.fc1(x))))).squeeze(-1)


def task_data(theta: float, seed: int, n: int, split: int = 0):
    g = torch.Generator().manual_seed(seed)  # the task directions depend on the seed only
    w0 = torch.randn(D, generator=g)
    w0 /= w0.norm()
    perp = torch.randn(D, generator=g)
    perp -= (perp @ w0) * w0
    perp /= perp.norm()
    w1 = math.cos(theta) * w0 + math.sin(theta) * perp
    g = torch.Generator().manual_seed(seed * 7919 + 1 + split)  # the inputs depend on the split too
    xs, ys, ts = [], [], []
    for t, w in enumerate((w0, w1)):
        x = torch.randn(n, D, generator=g)
        xs.append(torch.cat([x, torch.nn.functional.one_hot(torch.full((n,), t), 2).float()], 1))
        ys.append(torch.tanh(2 * x @ w))
        ts.append(torch.full((n,), t))
    return torch.cat(xs), torch.cat(ys), torch.cat(ts)


def train(method: str, theta: float, seed: int, tasks=(0, 1)) -> dict:
    from peft import LoraConfig, get_peft_model

    from ortho_lora_dist import OrthoLoRA, task_mean

    torch.manual_seed(1000 + seed)  # same frozen base and adapter init for every method
    model = get_peft_model(MLP(), LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2", "out"]))
    T = len(tasks)
    olr = OrthoLoRA(model, T, strategy="joint" if method == "joint" else "ortho", seed=seed)
    opt = torch.optim.AdamW(olr.lora_params, lr=LR, weight_decay=0.0)
    x_tr, y_tr, t_tr = task_data(theta, seed, 2048, split=0)
    x_te, y_te, t_te = task_data(theta, seed, 1024, split=1)
    keep = torch.isin(t_tr, torch.tensor(tasks))
    x_tr, y_tr, t_tr = x_tr[keep], y_tr[keep], t_tr[keep]
    local = {t: i for i, t in enumerate(tasks)}
    g = torch.Generator().manual_seed(seed)
    conflicts = []
    for _ in range(STEPS):
        idx = torch.cat(
            [torch.nonzero(t_tr == t).squeeze(1)[torch.randint(0, 2048, (BATCH,), generator=g)] for t in tasks]
        )
        tid = torch.tensor([local[int(t)] for t in t_tr[idx]])
        olr.zero_grad()
        olr.set_tasks(tid)
        olr.backward(task_mean((model(x_tr[idx]) - y_tr[idx]) ** 2, tid, T))
        result = olr.project()
        conflicts.append(float(result.conflict_rate.mean()))
        olr.write_grads(result)
        opt.step()
    with torch.no_grad():
        err = (model(x_te) - y_te) ** 2
    return {"mse": {t: float(err[t_te == t].mean()) for t in tasks}, "conflict_rate": sum(conflicts) / len(conflicts)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/conflict-knob")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--angles", type=float, nargs="+", default=[0, 45, 90, 120, 150, 180])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for deg in args.angles:
        theta = math.radians(deg)
        agg = {m: {0: [], 1: []} for m in ("single", "joint", "ortho")}
        conflict = {"joint": [], "ortho": []}
        for seed in range(args.seeds):
            for t in (0, 1):
                agg["single"][t].append(train("single", theta, seed, tasks=(t,))["mse"][t])
            for m in ("joint", "ortho"):
                r = train(m, theta, seed)
                conflict[m].append(r["conflict_rate"])
                for t in (0, 1):
                    agg[m][t].append(r["mse"][t])
        mean = {m: {t: sum(v) / len(v) for t, v in d.items()} for m, d in agg.items()}
        avg = {m: (mean[m][0] + mean[m][1]) / 2 for m in mean}
        row = {
            "theta_deg": deg,
            "mse": {m: {f"task{t}": round(v, 5) for t, v in d.items()} for m, d in mean.items()},
            "avg_mse": {m: round(v, 5) for m, v in avg.items()},
            "ortho_gain": round(avg["joint"] - avg["ortho"], 5),
            "conflict_rate_joint_run": round(sum(conflict["joint"]) / args.seeds, 3),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "knob.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "| theta | conflict rate (joint run) | single MSE | joint MSE | ortho MSE | ortho gain |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        a = r["avg_mse"]
        lines.append(
            f"| {r['theta_deg']:.0f} deg | {r['conflict_rate_joint_run']:.2f} | {a['single']:.4f} | {a['joint']:.4f} "
            f"| {a['ortho']:.4f} | {r['ortho_gain']:+.4f} |"
        )
    (out / "knob.md").write_text(
        "\n".join(lines) + f"\n\n{args.seeds} seeds, {STEPS} AdamW steps, test MSE averaged over the two tasks.\n"
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    th = [r["theta_deg"] for r in rows]
    for m in ("single", "joint", "ortho"):
        ax.plot(th, [r["avg_mse"][m] for r in rows], marker="o", label=m)
    ax.set_xlabel("angle between the tasks' target directions (deg)")
    ax.set_ylabel("test MSE (avg of 2 tasks)")
    ax.set_title("Gain of Ortho-LoRA vs amount of conflict")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "knob.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
