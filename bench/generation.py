"""Generation throughput at evaluation: ours (``run_eval``: batches of ``eval_batch_size`` prompts, tasks mixed,
KV cache) vs HF's own ``generate`` called directly on the same prompts (one task at a time, batches of the same
size, the tokenizer's left padding), interleaved ``--runs`` times, on the LLM demo's validation split.

New tokens are counted up to each row's end of turn (EOS); tokens/s = their sum / wall time. An ``--adapter``
(a run's adapter folder) is merged into the base first, so both sides generate with the same weights.

    python bench/generation.py --runs 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    from transformers import GenerationConfig

    from ortho_lora_dist.config import eval_batch_size, load_config
    from ortho_lora_dist.data.loading import load_tasks
    from ortho_lora_dist.evaluation.evaluate import run_eval
    from ortho_lora_dist.models.build import build_model
    from ortho_lora_dist.models.loading import load_tokenizer
    from ortho_lora_dist.runtime.distributed import init_distributed

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "demo_llm.yaml"))
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--split", default="validation")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)

    cfg = load_config(args.config, args.overrides)
    tasks = load_tasks(cfg.tasks)
    tok = load_tokenizer(cfg.model)
    torch.manual_seed(0)
    model = build_model(cfg, tasks, tok).eval()
    info = init_distributed()  # one process
    bs = eval_batch_size(cfg)
    hf = model.peft_model  # the same weights (LoRA B is zero at init: the base model's answers)
    eos = tok.eos_token_id

    def new_tokens(out: torch.Tensor, width: int) -> int:
        total = 0
        for row in out[:, width:].tolist():
            total += row.index(eos) + 1 if eos in row else len(row)
        return total

    def hf_generate() -> int:
        count = 0
        tok.padding_side = "left"
        for t, task in enumerate(tasks):
            prompts = [model.prompts.prompt(t, r) for r in task.splits[args.split]]
            for lo in range(0, len(prompts), bs):
                enc = tok(prompts[lo : lo + bs], return_tensors="pt", padding=True, add_special_tokens=True)
                gc = GenerationConfig(
                    max_new_tokens=task.config.generation.max_new_tokens,
                    do_sample=False,
                    eos_token_id=eos,
                    pad_token_id=tok.pad_token_id,
                )
                out = hf.generate(**enc, generation_config=gc)
                count += new_tokens(out, enc["input_ids"].shape[1])
        tok.padding_side = "right"
        return count

    # both decode greedily from the same prompts and weights: the same new tokens (counted on HF's side)
    times: dict[str, list[float]] = {"ours": [], "hf_generate": []}
    n = 0
    for _ in range(args.runs):
        t0 = time.perf_counter()
        n = hf_generate()
        times["hf_generate"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_eval(model, tasks, args.split, info, bs, losses=False, progress_bar=False)
        times["ours"].append(time.perf_counter() - t0)
    row = {
        "prompts": sum(len(t.splits[args.split]) for t in tasks),
        "eval_batch_size": bs,
        "new_tokens": n,
        "threads": torch.get_num_threads(),
        **{f"{k}_s": round(statistics.median(v), 2) for k, v in times.items()},
        **{f"{k}_tokens_per_s": round(n / statistics.median(v), 1) for k, v in times.items()},
        "ours/hf_time": round(statistics.median(times["ours"]) / statistics.median(times["hf_generate"]), 3),
    }
    print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
