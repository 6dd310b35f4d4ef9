"""Multi-task LoRA with exact per-task gradients from a TRL ``SFTTrainer`` script: the import and the class change,
the dataset gains a ``task`` column; TRL still applies the chat template and the completion-only loss.

Runs on CPU on the LLM demo's model and data (prepare them once with ``ortho-lora prepare-demo --llm``;
``pip install 'ortho-lora-dist[trl]'``):

    python examples/trl_sft.py --steps 4
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig

from ortho_lora_dist.integrations.trl import MultiTaskSFTTrainer  # instead of trl.SFTTrainer

TASKS = ["spell_backward", "basic_arithmetic", "letter_counting", "word_sorting"]


def conversations(data: Path, per_task: int) -> list[dict]:
    """TRL's conversational prompt-completion format (loss on the completion only) plus the task."""
    rows = []
    for task in TASKS:
        for line in (data / task / "train.jsonl").read_text().splitlines()[:per_task]:
            user, assistant = json.loads(line)["messages"]
            rows.append({"prompt": [user], "completion": [assistant], "task": task})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/demo_llm", help="prepared by `ortho-lora prepare-demo --llm`")
    p.add_argument("--model", help="the model folder (default: DATA/model)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=8, help="per device")
    p.add_argument("--strategy", default="ortho")
    p.add_argument("--padding-free", action="store_true", help="TRL's padding_free: each micro-batch as one row")
    p.add_argument("--out", default="runs/example_trl_sft")
    a = p.parse_args()
    data = Path(a.data)
    path = Path(a.model or data / "model")
    if not (path / "config.json").is_file():
        raise SystemExit(f"{path} not found: run `ortho-lora prepare-demo --llm` first")
    args = SFTConfig(
        output_dir=a.out,
        per_device_train_batch_size=a.batch,
        max_steps=a.steps,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,  # TRL's default is bf16 even on CPU
        gradient_checkpointing=False,
        padding_free=a.padding_free,
        **({"max_length": None} if a.padding_free else {}),
    )
    trainer = MultiTaskSFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(path),
        args=args,
        train_dataset=Dataset.from_list(conversations(data, per_task=64)),
        processing_class=AutoTokenizer.from_pretrained(path),
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
        strategy=a.strategy,
        task_column="task",
        task_names=TASKS,
    )
    trainer.train()
    if trainer.args.process_index == 0:
        last = [r for r in trainer.state.log_history if "loss" in r][-1]
        print(json.dumps({k: round(v, 4) for k, v in last.items() if k.startswith(("loss", "leverage"))}))
        trainer.save_model(a.out)


if __name__ == "__main__":
    main()
