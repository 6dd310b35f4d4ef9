"""One MultiTaskTrainer / MultiTaskSFTTrainer run on the tiny app Llama, for the integration tests (also under
torchrun). Writes the final LoRA weights and the log history to --out.

    python tests/integrations/hf_worker.py --model DIR --out DIR [--trainer hf|sft] [--strategy ortho] ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

TEXTS = [
    ("good great movie", " film", "sentiment"),
    ("the plot was", " very bad", "topic"),
    ("stock market bank", " shares trade oil price", "finance"),
    ("goal match", " team player coach", "topic"),
    ("vote", " election party", "finance"),
    ("nice love happy best", " the a", "sentiment"),
    ("awful poor hate sad worst movie", " film", "sentiment"),
    ("the actor in this scene", " was not good", "topic"),
]


# DeepSpeed ZeRO-2 through HF's integration: the shipped ds_configs/zero2.json ("auto" fields filled from
# TrainingArguments), plus what DeepSpeed's CPU accelerator needs to wrap torch's optimizers
ZERO2 = {**json.loads((ROOT / "ds_configs" / "zero2.json").read_text()), "zero_force_ds_cpu_optimizer": False}


def rows(n: int) -> list[dict]:
    return [{"prompt": p, "completion": c, "task": t} for p, c, t in (TEXTS * (n // len(TEXTS) + 1))[:n]]


def build_model(path: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(path)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(base, cfg)


def tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.eos_token
    return tok


def hf_dataset(tok, n: int):
    """prompt + completion token ids, labels on the completion only: what a user's preprocessing gives Trainer."""
    from datasets import Dataset

    out = []
    for r in rows(n):
        p = tok(r["prompt"])["input_ids"]
        c = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append({"input_ids": p + c, "labels": [-100] * len(p) + c, "task": r["task"]})
    return Dataset.from_list(out)


def make_trainer(a, model=None):
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq

    tok = tokenizer(a.model)
    model = model if model is not None else build_model(a.model)
    common = dict(
        output_dir=a.out,
        per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=a.accum,
        max_steps=a.steps,
        learning_rate=a.lr,
        optim=a.optim,
        lr_scheduler_type="constant",
        max_grad_norm=a.max_grad_norm,
        report_to=[],
        logging_steps=1,
        save_strategy="steps" if a.save_steps else "no",
        save_steps=a.save_steps or 500,
        train_sampling_strategy="sequential",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=a.checkpointing,
        seed=0,
        **({"deepspeed": ZERO2} if a.deepspeed else {}),
    )
    kw = dict(strategy=a.strategy, granularity=a.granularity, task_column="task")
    if a.trainer == "sft":
        from trl import SFTConfig

        from ortho_lora_dist.integrations.trl import MultiTaskSFTTrainer

        extra = {"padding_free": True, "max_length": None} if a.padding_free else {}
        args = SFTConfig(**common, **extra)
        return MultiTaskSFTTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(rows(a.samples)), processing_class=tok, **kw
        )
    from transformers import TrainingArguments

    from ortho_lora_dist.integrations.transformers import MultiTaskTrainer

    return MultiTaskTrainer(
        model=model,
        args=TrainingArguments(**common),
        train_dataset=hf_dataset(tok, a.samples),
        data_collator=DataCollatorForSeq2Seq(tok),
        **kw,
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--trainer", choices=["hf", "sft"], default="hf")
    p.add_argument("--strategy", default="ortho")
    p.add_argument("--granularity", default="factor")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--optim", default="adamw_torch")
    p.add_argument("--max-grad-norm", type=float, default=0.0)
    p.add_argument("--save-steps", type=int, default=0)
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--padding-free", action="store_true")
    p.add_argument("--deepspeed", action="store_true", help="ZeRO-2 through TrainingArguments(deepspeed=...)")
    p.add_argument("--resume", help="resume_from_checkpoint (a path, or 'last')")
    return p


def main(argv=None) -> None:
    import torch
    from safetensors.torch import save_file

    a = parser().parse_args(argv)
    trainer = make_trainer(a)
    trainer.train(resume_from_checkpoint=True if a.resume == "last" else a.resume)
    if trainer.args.process_index == 0:
        out = Path(a.out)
        weights = {n: p.detach().contiguous() for n, p in trainer.model.named_parameters() if p.requires_grad}
        save_file(weights, str(out / "final.safetensors"))
        (out / "log.json").write_text(json.dumps(trainer.state.log_history))
        (out / "engine.txt").write_text(type(trainer.model_wrapped).__name__)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


if __name__ == "__main__":
    main()
