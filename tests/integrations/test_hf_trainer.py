"""MultiTaskTrainer (transformers.Trainer) and MultiTaskSFTTrainer (TRL) against slow references, on the tiny app Llama
(fp32, TF32 irrelevant on CPU). Tolerances: 1e-5 relative (Frobenius norm of the difference over the reference's).

  - one SGD step (lr 1, no momentum, no clipping): the change of every LoRA factor == minus the strategy applied to the
    per-task gradients of T separate backward passes (OrthoLoRA mode="reference", full logits), for joint / ortho /
    imtl_g, on both trainers; TRL's default gradient checkpointing too
  - gradient accumulation 2 x half batch == 1 x full batch; TRL padding_free == padded
  - checkpoint + resume_from_checkpoint == the uninterrupted run, bitwise
  - 2 ranks (torchrun) == 1 process: DDP, and DeepSpeed ZeRO-2 through TrainingArguments(deepspeed=...)
  - what cannot work is refused before training, naming it
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tests.core.test_distributed import free_port
from tests.integrations import hf_worker

pytest.importorskip("trl")
ROOT = Path(__file__).resolve().parents[2]
TASKS = ["finance", "sentiment", "topic"]  # the sorted distinct names: the default task order


def rel(a: dict, b: dict) -> float:
    num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in b) ** 0.5
    return num / sum(float((b[k] ** 2).sum()) for k in b) ** 0.5


def args(env, tmp_path, *extra: str):
    return hf_worker.parser().parse_args(["--model", env["models"]["llama"], "--out", str(tmp_path), *extra])


def lora(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def reference_update(a, trainer, n: int) -> dict:
    """-combined of the strategy on per-task gradients from T separate backward passes over the same n samples."""
    from ortho_lora_dist import OrthoLoRA
    from ortho_lora_dist.integrations.transformers import TASK_KEY

    model = hf_worker.build_model(a.model)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
    olr = OrthoLoRA(model, len(TASKS), strategy=a.strategy, granularity=a.granularity, mode="reference", seed=0)
    model.train()
    fwd = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    logits = model(**fwd, use_cache=False).logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    keep = target != -100
    tok = F.cross_entropy(logits[keep], target[keep], reduction="none")
    tids = batch[TASK_KEY]
    tasks = tids[:, 1:][keep] if tids.dim() == 2 else tids[keep.nonzero()[:, 0]]
    losses = torch.zeros(len(TASKS)).index_add(0, tasks, tok) / torch.bincount(tasks, minlength=len(TASKS))
    olr.backward(losses)
    combined = olr.project().combined
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(f.param)]: -combined[f.offset : f.offset + f.numel].view_as(f.param) for f in olr.layout.factors}


@pytest.mark.parametrize(
    "trainer,strategy,extra",
    [
        ("hf", "joint", []),
        ("hf", "ortho", []),
        ("hf", "imtl_g", ["--granularity", "global"]),
        ("sft", "ortho", []),
        ("sft", "imtl_g", ["--granularity", "global", "--checkpointing"]),
    ],
)
def test_one_sgd_step_equals_the_strategy_on_t_backward_passes(env, tmp_path, trainer, strategy, extra):
    a = args(
        env,
        tmp_path,
        "--trainer",
        trainer,
        "--strategy",
        strategy,
        "--optim",
        "sgd",
        "--lr",
        "1",
        "--steps",
        "1",
        "--batch",
        "8",
        "--samples",
        "8",
        *extra,
    )
    tr = hf_worker.make_trainer(a)
    assert tr.task_names == TASKS
    before = lora(tr.model)
    tr.train()
    after = lora(tr.model)
    want = reference_update(a, tr, 8)
    got = {k: after[k] - before[k] for k in want}
    assert want and rel(got, want) < 1e-5, rel(got, want)
    logged = tr.state.log_history[0]
    assert {f"loss/{t}" for t in TASKS} | {f"grad_norm/{t}" for t in TASKS} | {"leverage/change"} <= logged.keys()


def _final(a) -> dict:
    tr = hf_worker.make_trainer(a)
    tr.train()
    return lora(tr.model)


def test_accumulation_equals_one_big_batch(env, tmp_path):
    sgd = ["--optim", "sgd", "--lr", "0.5", "--steps", "2"]  # AdamW's first steps are ~sign(g): no exactness test
    one = _final(args(env, tmp_path / "one", "--batch", "8", *sgd))
    two = _final(args(env, tmp_path / "two", "--batch", "4", "--accum", "2", *sgd))
    assert rel(two, one) < 1e-5


def test_trl_padding_free_equals_padded(env, tmp_path):
    common = ["--trainer", "sft", "--optim", "sgd", "--lr", "1", "--steps", "1", "--samples", "8"]
    padded = _final(args(env, tmp_path / "padded", *common))
    free = _final(args(env, tmp_path / "free", *common, "--padding-free"))
    assert rel(free, padded) < 1e-5


@pytest.mark.parametrize("trainer", ["hf", "sft"])
def test_resume_from_checkpoint_is_bitwise(env, tmp_path, trainer):
    full = args(env, tmp_path / "full", "--trainer", trainer, "--steps", "4", "--batch", "4", "--save-steps", "2")
    want = _final(full)
    assert (tmp_path / "full" / "checkpoint-2" / "ortho_lora_state.pt").is_file()
    resumed = args(env, tmp_path / "resumed", "--trainer", trainer, "--steps", "4", "--batch", "4")
    tr = hf_worker.make_trainer(resumed)
    tr.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    got = lora(tr.model)
    assert all(torch.equal(got[k], want[k]) for k in want), "resumed run differs"


def test_refusals_name_the_problem(env, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainingArguments

    from ortho_lora_dist.integrations.transformers import MultiTaskTrainer

    a = args(env, tmp_path)
    tok = hf_worker.tokenizer(a.model)
    ds = hf_worker.hf_dataset(tok, 8)
    targs = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    model = hf_worker.build_model(a.model)
    with pytest.raises(ValueError, match="no trainable LoRA"):
        MultiTaskTrainer(model=AutoModelForCausalLM.from_pretrained(a.model), args=targs, train_dataset=ds)
    with pytest.raises(ValueError, match="no task column 'domain'"):
        MultiTaskTrainer(model=model, args=targs, train_dataset=ds, task_column="domain")
    with pytest.raises(ValueError, match=r"row 2 of 'task' has task 'finance', not one of sentiment, topic"):
        MultiTaskTrainer(model=model, args=targs, train_dataset=ds, task_names=["sentiment", "topic"])
    with pytest.raises(ValueError, match="famo"):
        MultiTaskTrainer(model=model, args=targs, train_dataset=ds, strategy="famo")
    with pytest.raises(ValueError, match="MultiTaskTrainer: strategy 'ortho' has no option 'cc'"):
        MultiTaskTrainer(model=model, args=targs, train_dataset=ds, strategy="ortho", strategy_options={"cc": 1})
    fp16 = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], fp16=True)
    with pytest.raises(ValueError, match="fp16 is not supported"):
        MultiTaskTrainer(model=model, args=fp16, train_dataset=ds)
    bad = Dataset.from_list([{"input_ids": [1, 2], "labels": [1, 2], "task": 1.5}])
    with pytest.raises(ValueError, match="ints or task names"):
        MultiTaskTrainer(model=model, args=targs, train_dataset=bad)
    # accelerate's environment (what `accelerate launch` with a ZeRO-3 config sets), which TrainingArguments never
    # shows: HF builds a ZeRO-3 DeepSpeed state from it (on CPU too); refused after HF built it
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACCELERATE_USE_DEEPSPEED", "true")
        mp.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
        with pytest.raises(ValueError, match=r"ZeRO stage 3 is enabled \(from TrainingArguments or accelerate's env"):
            zero3 = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
            assert zero3.deepspeed is None  # what the check before HF's __init__ sees
            MultiTaskTrainer(model=model, args=zero3, train_dataset=ds)
    from trl import SFTConfig

    from ortho_lora_dist.integrations.trl import MultiTaskSFTTrainer

    sft = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], packing=True, bf16=False)
    with pytest.raises(ValueError, match="padding_free"):
        MultiTaskSFTTrainer(
            model=model, args=sft, train_dataset=Dataset.from_list(hf_worker.rows(4)), processing_class=tok
        )


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy,engine",
    [("joint", "ddp"), ("ortho", "ddp"), ("imtl_g", "ddp"), ("ortho", "deepspeed"), ("imtl_g", "deepspeed")],
)
def test_two_ranks_equal_one_process(env, tmp_path, strategy, engine):
    common = [
        "--model",
        env["models"]["llama"],
        "--strategy",
        strategy,
        "--steps",
        "2",
        "--samples",
        "16",
        "--optim",
        "sgd",
        "--lr",
        "0.5",
    ]
    launched = ["--deepspeed"] if engine == "deepspeed" else []  # the reference: one plain process
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    run_env["DS_ACCELERATOR"] = "cpu"
    worker = str(ROOT / "tests" / "integrations" / "hf_worker.py")
    single = [sys.executable, worker, *common, "--batch", "8", "--out", str(tmp_path / "single")]
    torchrun = str(Path(sys.executable).parent / "torchrun")
    ddp = [
        torchrun,
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        worker,
        *common,
        *launched,
        "--batch",
        "4",
        "--out",
        str(tmp_path / "ddp"),
    ]
    for cmd in (single, ddp):
        proc = subprocess.run(cmd, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    a, b = (
        load_file(str(tmp_path / "ddp" / "final.safetensors")),
        load_file(str(tmp_path / "single" / "final.safetensors")),
    )
    wrapped = (tmp_path / "ddp" / "engine.txt").read_text()
    assert wrapped == {"ddp": "DistributedDataParallel", "deepspeed": "DeepSpeedEngine"}[engine]
    assert a.keys() == b.keys() and a
    assert rel(a, b) < 1e-5, rel(a, b)
    la, lb = (json.loads((tmp_path / d / "log.json").read_text()) for d in ("ddp", "single"))
    for x, y in zip(la[:-1], lb[:-1], strict=True):
        assert all(abs(x[f"loss/{t}"] - y[f"loss/{t}"]) < 1e-5 for t in TASKS)


def test_per_task_eval_loss_from_eval_dataset(env, tmp_path):
    """trainer.evaluate() on an eval_dataset with the task column: eval_loss/TASK == the mean over the task's
    labelled tokens of the model's own full-logits token losses (1e-5)."""
    import torch.nn.functional as F
    from transformers import DataCollatorForSeq2Seq, TrainingArguments

    from ortho_lora_dist.integrations.transformers import MultiTaskTrainer

    a = args(env, tmp_path)
    tok = hf_worker.tokenizer(a.model)
    train, held_out = hf_worker.hf_dataset(tok, 8), hf_worker.hf_dataset(tok, 11)
    targs = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_eval_batch_size=4)
    model = hf_worker.build_model(a.model)
    collator = DataCollatorForSeq2Seq(tok, padding=True)
    trainer = MultiTaskTrainer(
        model=model, args=targs, train_dataset=train, eval_dataset=held_out, data_collator=collator, strategy="joint"
    )
    metrics = trainer.evaluate()
    want: dict[str, list[float]] = {}
    with torch.no_grad():
        for row in held_out:
            ids = torch.tensor([row["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1]
            target = torch.tensor(row["labels"][1:])
            keep = target != -100
            want.setdefault(row["task"], []).extend(
                F.cross_entropy(logits[keep], target[keep], reduction="none").tolist()
            )
    assert set(want) == set(TASKS)
    for name, values in want.items():
        assert metrics[f"eval_loss/{name}"] == pytest.approx(sum(values) / len(values), rel=1e-5)


def test_task_balanced_sampler_puts_every_task_in_every_run_of_t():
    from ortho_lora_dist.integrations.tasks import TaskBalancedSampler

    tasks = [0] * 10 + [1] * 3 + [2] * 1
    sampler = TaskBalancedSampler(tasks, seed=0)
    order = list(sampler)
    assert len(order) == len(sampler) == 30  # the largest task's 10, times 3 tasks
    for k in range(0, 30, 3):
        assert sorted(tasks[i] for i in order[k : k + 3]) == [0, 1, 2]
    assert sorted(i for i in order if tasks[i] == 0) == list(range(10))  # the largest task once per epoch
    assert list(sampler) != order  # reshuffled every epoch
