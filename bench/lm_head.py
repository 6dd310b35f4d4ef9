"""Peak memory and step time of a causal-LM training step: lm_head on the labelled positions only (what
``CausalLMMultiTask`` does) vs full [B, S, V] fp32 logits (what it did before), on the LLM demo.

Each mode runs in its own process (so that peak RSS is its own), alternately, ``--runs`` times; a run trains
``--steps`` Ortho-LoRA steps (one backward, AdamW) on the demo config's first batches, the same in both modes,
and reports the median seconds per step and the process's peak RSS. Prepare the demo first
(``ortho-lora prepare-demo --llm``).

    python bench/lm_head.py --runs 3 --steps 4
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def full_logits_losses(model, batch):
    """The former computation: logits for every position, in fp32, then the answer tokens' cross-entropy."""
    import torch.nn.functional as F

    from ortho_lora_dist.core.losses import task_mean

    logits = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    target = batch["labels"][:, 1:]
    flat = logits.float().reshape(-1, logits.shape[-1])
    loss = F.cross_entropy(flat, target.reshape(-1).clamp_min(0), reduction="none")
    tids = batch["task_ids"][:, None].expand_as(target)
    return task_mean(loss.view(target.shape), tids, len(model.tasks), (target != -100).float())


def one_run(args) -> dict:
    import torch

    from ortho_lora_dist.config import load_config
    from ortho_lora_dist.core.step import OrthoLoRA
    from ortho_lora_dist.data.loading import load_tasks
    from ortho_lora_dist.models.build import build_model
    from ortho_lora_dist.models.loading import load_tokenizer

    cfg = load_config(args.config, args.overrides)
    tasks = load_tasks(cfg.tasks)
    torch.manual_seed(0)
    model = build_model(cfg, tasks, load_tokenizer(cfg.model))
    olr = OrthoLoRA(model.peft_model, len(tasks))
    opt = torch.optim.AdamW(olr.lora_params, lr=1e-4)
    per = cfg.train.per_task_batch_size
    times = []
    for step in range(args.steps + 1):  # step 0: warm-up, not timed
        records, tids = [], []
        for t, task in enumerate(tasks):
            rows = task.splits["train"][step * per : (step + 1) * per]
            records += rows
            tids += [t] * len(rows)
        batch = model.collate(records, tids)
        t0 = time.perf_counter()
        olr.zero_grad()
        olr.set_tasks(batch["task_ids"])
        losses = full_logits_losses(model, batch) if args.mode == "full" else model.task_losses(batch)
        olr.backward(losses)
        olr.write_grads(olr.project())
        opt.step()
        if step:
            times.append(time.perf_counter() - t0)
    return {
        "mode": args.mode,
        "seconds_per_step": round(statistics.median(times), 3),
        "peak_rss_GB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "tokens_per_step": int(batch["attention_mask"].sum()),
        "labelled_per_step": int((batch["labels"] != -100).sum()),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "demo_llm.yaml"))
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    p.add_argument("--runs", type=int, default=3, help="processes per mode, alternating")
    p.add_argument("--steps", type=int, default=4, help="timed steps per process (after one warm-up step)")
    p.add_argument("--mode", choices=["full", "labelled"], help="one run in this process (what --runs starts)")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.mode:
        print(json.dumps(one_run(args)), flush=True)
        return
    rows = []
    for i in range(args.runs):
        for mode in ("full", "labelled"):
            cmd = [sys.executable, __file__, "--mode", mode, "--config", args.config, "--steps", str(args.steps)]
            out = subprocess.run([*cmd, *args.overrides], check=True, capture_output=True, text=True).stdout
            rows.append({"run": i, **json.loads(out.strip().splitlines()[-1])})
            print(json.dumps(rows[-1]), flush=True)
    for mode in ("full", "labelled"):
        mine = [r for r in rows if r["mode"] == mode]
        print(
            f"{mode:9s} median s/step {statistics.median(r['seconds_per_step'] for r in mine):.3f}  "
            f"peak RSS {statistics.median(r['peak_rss_GB'] for r in mine):.2f} GB  ({len(mine)} runs)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
