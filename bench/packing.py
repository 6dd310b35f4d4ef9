"""Throughput of packed vs padded micro-batches: useful (non-pad) tokens per second of a training step, and packing
efficiency (useful / all tokens of the rows), on the LLM demo's chat tasks (SmolLM2-135M-Instruct).

The micro-batches are the ones training draws (MultiTaskSampler, the demo config's per_task_batch_size, all five
prepared tasks by default: gsm_symbolic's long prompts next to one-word answers give the length spread of real
instruction data). Each micro-batch is timed padded and packed, one after the other, the order alternating, in
one process (machines are noisy: the ratio is what to read); a step is forward + one backward (per-task capture) +
projection, no optimizer step, so every step sees the same weights. Prepare the demo first
(``ortho-lora prepare-demo --llm``).

    python bench/packing.py --steps 6          # one JSON line: packed/padded tokens per second, efficiencies
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
GSM = {
    "name": "gsm_symbolic",
    "files": {s: f"data/demo_llm/gsm_symbolic/{s}.jsonl" for s in ("train", "validation", "test")},
    "format": "chat",
    "generation": {"max_new_tokens": 8},
}


def build(args):
    import torch

    from ortho_lora_dist.config import Config
    from ortho_lora_dist.core.step import OrthoLoRA
    from ortho_lora_dist.data.loading import load_tasks
    from ortho_lora_dist.data.sampling import MultiTaskSampler
    from ortho_lora_dist.models.build import build_model
    from ortho_lora_dist.models.loading import load_tokenizer

    raw = yaml.safe_load(Path(args.config).read_text())
    if not args.four_tasks:
        raw["tasks"].append(GSM)
    raw["lora"]["dropout"] = 0.0
    raw["train"]["packing"] = True
    if args.attn:
        raw["model"]["attn_implementation"] = args.attn
    cfg = Config.model_validate(raw)
    tasks = load_tasks(cfg.tasks)
    torch.manual_seed(0)
    model = build_model(cfg, tasks, load_tokenizer(cfg.model))
    olr = OrthoLoRA(model.peft_model, len(tasks), strategy=args.strategy)
    sampler = MultiTaskSampler([len(t.splits["train"]) for t in tasks], cfg.train.per_task_batch_size, 0, 0, 1)
    return model, olr, tasks, sampler


def step(model, olr, batch) -> float:
    t0 = time.perf_counter()
    olr.zero_grad()
    olr.set_tasks(batch.get("token_task_ids", batch["task_ids"]))
    olr.backward(model.task_losses(batch))
    olr.project()
    return time.perf_counter() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "demo_llm.yaml"))
    p.add_argument("--steps", type=int, default=6, help="micro-batches timed (after one warm-up of each mode)")
    p.add_argument("--four-tasks", action="store_true", help="the demo's four tasks only (no gsm_symbolic)")
    p.add_argument("--strategy", default="ortho")
    p.add_argument("--attn", choices=["sdpa", "eager", "flash_attention_2"], help="model.attn_implementation")
    args = p.parse_args(argv)
    import os

    os.chdir(ROOT)  # the config's data paths are relative to the checkout
    from ortho_lora_dist.data.packing import efficiency

    model, olr, tasks, sampler = build(args)
    seconds = {"padded": [], "packed": []}
    tokens, eff = [], {"padded": [], "packed": []}
    shapes = {"padded": [], "packed": []}
    for i in range(args.steps + 1):
        picks = sampler.next()
        records = [tasks[t].splits["train"][j] for t, j in picks]
        tids = [t for t, _ in picks]
        batches = {"padded": model.collate(records, tids), "packed": model.collate_packed(records, tids)}
        order = ("padded", "packed") if i % 2 else ("packed", "padded")
        for mode in order:
            s = step(model, olr, batches[mode])
            if i:  # i == 0: warm-up
                seconds[mode].append(s)
                eff[mode].append(efficiency(batches[mode]))
                shapes[mode].append(list(batches[mode]["input_ids"].shape))
        if i:
            tokens.append(int(batches["padded"]["attention_mask"].sum()))
    useful = sum(tokens)
    rate = {m: useful / sum(seconds[m]) for m in seconds}
    print(
        json.dumps(
            {
                "tasks": [t.name for t in tasks],
                "steps": args.steps,
                "useful_tokens_per_step": round(useful / args.steps, 1),
                "padded_tokens_per_s": round(rate["padded"], 1),
                "packed_tokens_per_s": round(rate["packed"], 1),
                "packed/padded": round(rate["packed"] / rate["padded"], 3),
                "padded_s_per_step": round(statistics.median(seconds["padded"]), 3),
                "packed_s_per_step": round(statistics.median(seconds["packed"]), 3),
                "efficiency_padded": round(statistics.mean(eff["padded"]), 3),
                "efficiency_packed": round(statistics.mean(eff["packed"]), 3),
                "shapes_padded": shapes["padded"][:3],
                "shapes_packed": shapes["packed"][:3],
                "attn_implementation": model.attn_implementation,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
