"""Multi-task LoRA with exact per-task gradients from a plain ``transformers.Trainer`` script: two lines change
(the import and the class; the dataset gains a ``task`` column).

Runs on CPU on the LLM demo's model and data (SmolLM2-135M-Instruct and four reasoning-gym chat tasks; prepare them
once with ``ortho-lora prepare-demo --llm``):

    python examples/hf_trainer.py --steps 4                      # one process
    torchrun --nproc_per_node 2 examples/hf_trainer.py --steps 4 # DDP: the same updates as one process
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, TrainingArguments

from ortho_lora_dist.integrations.transformers import MultiTaskTrainer  # 1. instead of transformers.Trainer

TASKS = ["spell_backward", "basic_arithmetic", "letter_counting", "word_sorting"]


def chat_rows(tok, data: Path, per_task: int) -> list[dict]:
    """prompt (chat template up to the assistant turn) + answer tokens, labels on the answer only, and the task."""
    rows = []
    for task in TASKS:
        lines = (data / task / "train.jsonl").read_text().splitlines()[:per_task]
        for line in lines:
            user, assistant = json.loads(line)["messages"]
            prompt = tok.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            a = tok(assistant["content"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            rows.append({"input_ids": p + a, "labels": [-100] * len(p) + a, "task": task})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/demo_llm", help="prepared by `ortho-lora prepare-demo --llm`")
    p.add_argument("--model", help="the model folder (default: DATA/model)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=8, help="per device")
    p.add_argument("--strategy", default="ortho")
    p.add_argument("--out", default="runs/example_hf_trainer")
    a = p.parse_args()
    data = Path(a.data)
    path = Path(a.model or data / "model")
    if not (path / "config.json").is_file():
        raise SystemExit(f"{path} not found: run `ortho-lora prepare-demo --llm` first")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    train = Dataset.from_list(chat_rows(tok, data, per_task=64))
    args = TrainingArguments(
        output_dir=a.out,
        per_device_train_batch_size=a.batch,
        max_steps=a.steps,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
    )
    trainer = MultiTaskTrainer(  # 2. the strategy and where the task is; everything else is HF's
        model=model,
        args=args,
        train_dataset=train,
        data_collator=DataCollatorForSeq2Seq(tok),
        strategy=a.strategy,
        task_column="task",
        task_names=TASKS,
    )
    trainer.train()
    if trainer.args.process_index == 0:
        last = [r for r in trainer.state.log_history if "loss" in r][-1]
        print(json.dumps({k: round(v, 4) for k, v in last.items() if k.startswith(("loss", "leverage"))}))
        trainer.save_model(a.out)  # a PEFT adapter folder: PeftModel.from_pretrained loads it


if __name__ == "__main__":
    main()
