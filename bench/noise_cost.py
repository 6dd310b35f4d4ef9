"""Per-step cost of capturing each task's two halves (train.noise_every, train.gram: debiased) against the plain step.

    python bench/noise_cost.py configs/demo_llm.yaml --steps 8 [--strategy norm_balance]

Builds one Trainer per variant on the same config in this process (plain; noise_every = steps, i.e. telemetry on;
gram debiased), then times train_step() round-robin, variant after variant on every round, so machine noise hits
them alike; reports median seconds per step (after one warm-up step) and the ratio to plain. CPU time of this
process (``--clock cpu``, default) or wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--strategy", default="norm_balance")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    from ortho_lora_dist.config import load_config
    from ortho_lora_dist.training.recipe import Trainer

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    tmp = Path(tempfile.mkdtemp(prefix="ortho-lora-noise-cost-"))
    common = [f"train.strategy={args.strategy}", "train.packing=false", "train.steps=1000", "train.report_to=[]"]
    variants = {
        "plain": [],
        "noise_every": [f"train.noise_every={args.steps}"],
        "gram_debiased": ["train.gram=debiased"],
    }
    trainers = {
        k: Trainer(load_config(args.config, [*common, *v, f"output_dir={tmp / k}"])) for k, v in variants.items()
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    try:
        for step in range(args.steps + 1):
            for k, trainer in trainers.items():
                start = clock()
                trainer.train_step()
                if step:  # the first step warms up (allocations, kernels)
                    times[k].append(clock() - start)
            print(f"round {step}/{args.steps}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items() if v),
                  file=sys.stderr, flush=True)  # fmt: skip
    finally:
        for trainer in trainers.values():
            trainer.cleanup()
    median = {k: statistics.median(v) for k, v in times.items()}
    summary = {
        "config": str(args.config),
        "strategy": args.strategy,
        "steps": args.steps,
        "clock": args.clock,
        "median_s": median,
        "ratio_to_plain": {k: v / median["plain"] for k, v in median.items()},
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
