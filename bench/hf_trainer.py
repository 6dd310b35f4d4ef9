"""Step time of MultiTaskTrainer (exact per-task gradients, strategy ortho) vs plain transformers.Trainer on the same
model, data and batches (the LLM demo: SmolLM2-135M-Instruct, four chat tasks; ``ortho-lora prepare-demo --llm``).

Each mode runs in its own process, alternately, ``--runs`` times; a run trains ``--steps`` steps (sequential
sampler: the same batches in both modes) and reports the median seconds per step after the first (a callback times
on_step_begin -> on_step_end: forward, backward, our reduce/combine, clipping, optimizer). Prints one JSON line
per run and the medians.

    python bench/hf_trainer.py --runs 3 --steps 6
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


def one_run(a) -> dict:
    import torch
    from datasets import Dataset
    from hf_trainer import TASKS, chat_rows
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    data = ROOT / "data" / "demo_llm"
    tok = AutoTokenizer.from_pretrained(data / "model")
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(data / "model"),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    rows = chat_rows(tok, data, per_task=64)
    rows = [rows[i + 64 * t] for i in range(64) for t in range(len(TASKS))]  # interleaved: every batch mixes tasks
    train = Dataset.from_list(rows)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *args, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, *args, **kw):
            times.append(time.perf_counter() - self.t0)

    args = TrainingArguments(
        output_dir=a.out,
        per_device_train_batch_size=a.batch,
        max_steps=a.steps,
        learning_rate=1e-3,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        train_sampling_strategy="sequential",
        logging_steps=10_000,
        disable_tqdm=True,
    )
    kw = dict(
        model=model, args=args, train_dataset=train, data_collator=DataCollatorForSeq2Seq(tok), callbacks=[Clock()]
    )
    if a.mode == "plain":
        trainer = Trainer(**{**kw, "train_dataset": train.remove_columns("task")})
    else:
        from ortho_lora_dist.integrations.transformers import MultiTaskTrainer

        trainer = MultiTaskTrainer(**kw, strategy="ortho", task_column="task", task_names=TASKS)
    trainer.train()
    return {"mode": a.mode, "seconds_per_step": round(statistics.median(times[1:]), 3), "steps": len(times)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--mode", choices=["plain", "multitask"])
    p.add_argument("--out", default="/tmp/bench_hf_trainer")
    a = p.parse_args(argv)
    if a.mode:
        print(json.dumps(one_run(a)), flush=True)
        return
    rows = []
    for _ in range(a.runs):
        for mode in ("plain", "multitask"):
            cmd = [sys.executable, __file__, "--mode", mode, "--steps", str(a.steps), "--batch", str(a.batch)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    med = {m: statistics.median(r["seconds_per_step"] for r in rows if r["mode"] == m) for m in ("plain", "multitask")}
    print(
        json.dumps(
            {
                "plain_s_per_step": med["plain"],
                "multitask_s_per_step": med["multitask"],
                "multitask/plain": round(med["multitask"] / med["plain"], 3),
                "runs": a.runs,
            }
        )
    )


if __name__ == "__main__":
    main()
