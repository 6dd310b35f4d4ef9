"""Side by side with TRL: useful (labelled) tokens per second and peak RSS of TRL's ``SFTTrainer`` (padding-free
and packed), ``ortho-lora train`` (joint and ortho, packed) and our ``MultiTaskSFTTrainer`` (padding-free, joint),
on the LLM demo's model and four chat tasks (``ortho-lora prepare-demo --llm``).

Every mode trains on the same samples (the first ``steps x 4`` records of each task: one pass), 16 samples a step
(4 per task), LoRA r=8, alpha=16, dropout 0, all linear layers, AdamW lr 1e-3 (linear decay, no warm-up),
clipping at 1.0, fp32 on CPU, max_length 200, loss on the answer tokens only, activation checkpointing off
(``--checkpointing``: on in every mode). These settings are pinned here, not taken from configs/demo_llm.yaml
(which turns checkpointing on for the demo). Each run is one process (its peak RSS from ``os.wait4``), the modes
interleaved (mode 1, mode 2, ..., then again), ``--repeats`` times. A step's time ends when its optimizer step
returns (TRL / HF: ``on_step_end``; ``ortho-lora train``: the recipe's ``train_step``); throughput = labelled
tokens of the steps after the ``--warmup`` ones / the time from the end of the last warm-up step to the end of
the last step (data loading, collation and logging included, model loading and the final save excluded).
"Labelled" is each trainer's own loss tokens (labels != -100; the same tokens in every mode: answer + end of turn).

    python bench/peers.py --repeats 3 --steps 8          # writes bench/results/peers.json, prints the table

``--data`` / ``--model`` point elsewhere (the smoke test: a tiny random Llama and generated chat tasks).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo_llm.yaml"
PER_TASK, LR, MAX_LENGTH, R, ALPHA = 4, 1e-3, 200, 8, 16
MODES = {  # name -> what runs
    "trl-padding-free": "TRL SFTTrainer, padding_free=True",
    "trl-packed": "TRL SFTTrainer, packing=True (bfd, rows of max_length)",
    "ours-joint": "ortho-lora train, strategy joint, train.packing=true",
    "ours-ortho": "ortho-lora train, strategy ortho, train.packing=true",
    "mt-sft-joint": "MultiTaskSFTTrainer, padding_free=True, strategy joint",
}
BASELINE = "trl-padding-free"


def demo_tasks() -> list[str]:
    import yaml

    return [t["name"] for t in yaml.safe_load(CONFIG.read_text())["tasks"]]


class Clock:
    """Per optimizer step: the time it ended, its labelled tokens, input tokens and samples."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.labelled: list[int] = []
        self.inputs: list[int] = []
        self.samples: list[int] = []
        self._acc = [0, 0, 0]

    def count(self, labelled: int, inputs: int, samples: int) -> None:
        self._acc = [self._acc[0] + labelled, self._acc[1] + inputs, self._acc[2] + samples]

    def step_done(self) -> None:
        self.ends.append(time.perf_counter())
        for lst, v in zip((self.labelled, self.inputs, self.samples), self._acc):
            lst.append(v)
        self._acc = [0, 0, 0]

    def summary(self, warmup: int) -> dict:
        import resource

        n = len(self.ends)
        if n <= warmup:
            raise SystemExit(f"{n} steps ran: nothing left after {warmup} warm-up step(s)")
        seconds = self.ends[-1] - self.ends[warmup - 1] if warmup else None
        if seconds is None:
            raise SystemExit("--warmup must be at least 1 (the first step's start is not timed)")
        timed = n - warmup
        lab, inp, smp = (sum(x[warmup:]) for x in (self.labelled, self.inputs, self.samples))
        return {
            "steps": n,
            "timed_steps": timed,
            "seconds_per_step": round(seconds / timed, 4),
            "median_step_s": round(
                statistics.median(b - a for a, b in zip(self.ends[warmup - 1 :], self.ends[warmup:])), 4
            ),
            "labelled_tokens_per_s": round(lab / seconds, 3),
            "input_tokens_per_s": round(inp / seconds, 2),
            "samples_per_s": round(smp / seconds, 4),
            "labelled_per_step": round(lab / timed, 2),
            "inputs_per_step": round(inp / timed, 1),
            "samples_per_step": round(smp / timed, 2),
            "rss_after_steps_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }


# -- one run of one mode (in its own process) ---------------------------------------------------------------------
def run_trl(a, clock: Clock) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    tasks, k = a.tasks, a.steps * PER_TASK
    per_task = []
    for task in tasks:
        lines = (Path(a.data) / task / "train.jsonl").read_text().splitlines()[:k]
        if len(lines) < k:
            raise SystemExit(f"{a.data}/{task}/train.jsonl: {len(lines)} records, {k} needed")
        per_task.append([json.loads(x)["messages"] for x in lines])
    # interleaved: every run of 16 consecutive rows holds 4 of each task (the sequential sampler keeps the order)
    rows = [
        {"prompt": per_task[t][i][:-1], "completion": per_task[t][i][-1:], "task": task}
        for i in range(k)
        for t, task in enumerate(tasks)
    ]
    packed = a.mode == "trl-packed"
    multitask = a.mode == "mt-sft-joint"
    tok = AutoTokenizer.from_pretrained(a.model)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)

    def config(batch: int):
        return SFTConfig(
            output_dir=a.out,
            per_device_train_batch_size=batch,
            max_steps=a.steps,
            learning_rate=LR,
            lr_scheduler_type="linear",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            seed=0,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=a.checkpointing,
            train_sampling_strategy="sequential",
            logging_steps=a.steps,
            disable_tqdm=True,
            completion_only_loss=True,
            dataloader_num_workers=0,
            padding_free=not packed,
            packing=packed,
            max_length=MAX_LENGTH if packed else None,  # padding-free: no truncation (every sample < 200 tokens)
        )

    class Counting:
        def training_step(self, model, inputs, *args, **kw):
            labels, ids = inputs["labels"], inputs["input_ids"]
            if "position_ids" in inputs:  # padding-free: one row, samples start at position 0
                samples = int((inputs["position_ids"] == 0).sum())
                n_inputs = ids.numel()
            else:
                samples = ids.shape[0]
                n_inputs = int(inputs["attention_mask"].sum())
            clock.count(int((labels != -100).sum()), n_inputs, samples)
            return super().training_step(model, inputs, *args, **kw)

    class StepEnd(TrainerCallback):
        def on_step_end(self, *args, **kw):
            clock.step_done()

    lora = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    data = Dataset.from_list(rows)
    kw = dict(model=model, processing_class=tok, peft_config=lora, callbacks=[StepEnd()])
    batch = PER_TASK * len(tasks)
    if multitask:
        from ortho_lora_dist.integrations.trl import MultiTaskSFTTrainer

        cls = type("Counted", (Counting, MultiTaskSFTTrainer), {})
        extra = dict(strategy="joint", task_column="task", task_names=tasks)
    else:
        cls = type("Counted", (Counting, SFTTrainer), {})
        extra = {}
        data = data.remove_columns("task")
    trainer = cls(args=config(batch), train_dataset=data, **kw, **extra)
    if packed:
        # the same samples in the same number of steps: TRL packs the whole set into rows of max_length before
        # batching, so a batch counts rows; take as many rows a step as one pass in --steps steps needs
        rows_total = len(trainer.train_dataset)
        trainer._train_batch_size = max(1, round(rows_total / a.steps))
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    return {"trainable_params": trainable}


def run_ours(a, clock: Clock) -> dict:
    """``ortho-lora train`` through its CLI entry point, the recipe's train_step timed (the final save after the
    last step is not)."""
    from ortho_lora_dist.cli import main as cli
    from ortho_lora_dist.models.causal_lm import CausalLMMultiTask
    from ortho_lora_dist.training import recipe

    count_tasks = CausalLMMultiTask.task_counts
    step = recipe.Trainer.train_step
    trainable = {}

    def task_counts(self, batch):  # called once per micro-batch in train_step, before the forward
        ids = batch["input_ids"]
        inputs = int((batch["token_task_ids"] >= 0).sum()) if "token_task_ids" in batch else ids.numel()
        clock.count(int(batch["labelled_task_ids"].numel()), inputs, int(batch["task_ids"].numel()))
        return count_tasks(self, batch)

    def train_step(self):
        if not trainable:
            trainable["n"] = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        out = step(self)
        clock.step_done()
        return out

    CausalLMMultiTask.task_counts = task_counts
    recipe.Trainer.train_step = train_step
    k = a.steps * PER_TASK
    overrides = [
        f"model.name_or_path={a.model}",
        f"model.max_length={MAX_LENGTH}",
        "model.dtype=float32",
        f"lora.r={R}",
        f"lora.alpha={ALPHA}",
        "lora.dropout=0.0",
        "lora.target_modules=all-linear",
        f"train.strategy={a.mode.split('-')[1]}",
        "train.granularity=factor",
        "train.packing=true",
        f"train.gradient_checkpointing={str(a.checkpointing).lower()}",
        "train.gradient_accumulation=1",
        "train.task_sampling=equal",
        "train.weight_decay=0.0",
        f"train.steps={a.steps}",
        f"train.per_task_batch_size={PER_TASK}",
        f"train.lr={LR}",
        "train.schedule=linear",
        "train.warmup_ratio=0.0",
        "train.max_grad_norm=1.0",
        "train.seed=0",
        f"train.log_every={a.steps}",
        "train.eval_every=0",
        "train.plots=false",
        "train.report_to=[]",
        "distributed.data_cache=null",
        f"output_dir={Path(a.out) / 'run'}",
    ]
    for i, task in enumerate(a.tasks):  # training files only: no final evaluation
        overrides += [
            f"tasks.{i}.files={{train: {Path(a.data) / task / 'train.jsonl'}}}",
            f"tasks.{i}.max_train_samples={k}",
        ]
    rc = cli(["train", str(CONFIG), *overrides])
    if rc:
        raise SystemExit(f"ortho-lora train exited {rc}")
    return {"trainable_params": trainable.get("n")}


def one_run(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    clock = Clock()
    info = run_ours(a, clock) if a.mode.startswith("ours-") else run_trl(a, clock)
    return {"mode": a.mode, **clock.summary(a.warmup), **info}


# -- the driver ---------------------------------------------------------------------------------------------------
def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "platform": platform.platform(), "python": platform.python_version()}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "trl", "peft", "datasets", "ortho-lora-dist"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def launch(a, mode: str, repeat: int) -> dict:
    """One run in a fresh process; its own peak RSS from wait4 (RUSAGE_CHILDREN would give the max over all)."""
    with tempfile.TemporaryDirectory(prefix=f"peers-{mode}-") as tmp:
        cmd = [sys.executable, __file__, "--mode", mode, "--out", tmp, "--data", a.data, "--model", a.model]
        cmd += ["--checkpointing"] if a.checkpointing else []
        cmd += ["--steps", str(a.steps), "--warmup", str(a.warmup), "--threads", str(a.threads), "--tasks", *a.tasks]
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(a.threads),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        env["PYTHONWARNINGS"] = "ignore"
        out_path, err_path = Path(tmp) / "stdout", Path(tmp) / "stderr"
        with out_path.open("w") as out, err_path.open("w") as err:
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, env=env)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t0
        rc = os.waitstatus_to_exitcode(status)
        proc.returncode = rc
        if rc:
            sys.stderr.write(err_path.read_text()[-6000:])
            raise SystemExit(f"{mode} (repeat {repeat}) exited {rc}")
        lines = [x for x in out_path.read_text().splitlines() if x.startswith("{")]
        row = json.loads(lines[-1])
    return {**row, "repeat": repeat, "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "process_s": round(wall, 1)}


def summarize(rows: list[dict], modes: list[str]) -> dict:
    out = {}
    for m in modes:
        rs = [r for r in rows if r["mode"] == m]
        med = {
            k: statistics.median(r[k] for r in rs)
            for k in (
                "labelled_tokens_per_s",
                "samples_per_s",
                "input_tokens_per_s",
                "seconds_per_step",
                "peak_rss_mb",
                "labelled_per_step",
                "samples_per_step",
            )
        }
        med["labelled_tokens_per_s_range"] = [
            min(r["labelled_tokens_per_s"] for r in rs),
            max(r["labelled_tokens_per_s"] for r in rs),
        ]
        out[m] = med
    base = out.get(BASELINE)
    for m in out:
        if base:
            out[m]["vs_trl_padding_free"] = round(out[m]["labelled_tokens_per_s"] / base["labelled_tokens_per_s"], 3)
            out[m]["samples_vs_trl_padding_free"] = round(out[m]["samples_per_s"] / base["samples_per_s"], 3)
    return out


def table(summary: dict) -> str:
    lines = [
        "| mode | what runs | useful tok/s (median, min-max) | vs TRL padding-free | samples/s | "
        "labelled tok / sample | s/step | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, s in summary.items():
        lo, hi = s["labelled_tokens_per_s_range"]
        ratio = s.get("vs_trl_padding_free")
        sratio = s.get("samples_vs_trl_padding_free")
        lines.append(
            f"| {m} | {MODES[m]} | {s['labelled_tokens_per_s']:.1f} ({lo:.1f}-{hi:.1f}) | "
            f"{'' if ratio is None else f'{ratio:.2f}x'} (samples/s: {'' if sratio is None else f'{sratio:.2f}x'}) | "
            f"{s['samples_per_s']:.2f} | {s['labelled_per_step'] / s['samples_per_step']:.2f} | "
            f"{s['seconds_per_step']:.2f} | {s['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1, help="steps left out of the timing (at least 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS)")
    p.add_argument(
        "--checkpointing", action="store_true", help="activation checkpointing in every mode (default: off in all)"
    )
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--data", default=str(ROOT / "data" / "demo_llm"), help="<task>/train.jsonl chat records")
    p.add_argument("--model", help="the model folder (default: DATA/model)")
    p.add_argument("--tasks", nargs="+", help="default: the tasks of configs/demo_llm.yaml")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "peers.json"), help="where the results go")
    p.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)  # one run (the driver's child)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.model = a.model or str(Path(a.data) / "model")
    a.tasks = a.tasks or demo_tasks()
    if a.warmup < 1 or a.steps <= a.warmup:
        p.error("need --warmup >= 1 and --steps > --warmup")
    if a.mode:
        print(json.dumps(one_run(a)), flush=True)
        return
    if not (Path(a.model) / "config.json").is_file():
        raise SystemExit(f"{a.model} not found: run `ortho-lora prepare-demo --llm` first")
    rows = []
    for repeat in range(a.repeats):
        for mode in a.modes:
            rows.append(launch(a, mode, repeat))
            print(json.dumps(rows[-1]), flush=True)
    summary = summarize(rows, a.modes)
    md = table(summary)
    print(md)
    doc = {
        "command": "python bench/peers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "versions": versions(),
        "settings": {
            "data": a.data,
            "model": a.model,
            "tasks": a.tasks,
            "steps": a.steps,
            "warmup": a.warmup,
            "threads": a.threads,
            "activation_checkpointing": a.checkpointing,
            "repeats": a.repeats,
            "samples_per_step": PER_TASK * len(a.tasks),
            "lora": {"r": R, "alpha": ALPHA, "dropout": 0.0, "target_modules": "all-linear"},
            "lr": LR,
            "max_length": MAX_LENGTH,
        },
        "modes": MODES,
        "summary": summary,
        "table": md,
        "runs": rows,
    }
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
