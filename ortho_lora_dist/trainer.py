"""The training recipe: config -> data -> process group -> model -> Ortho-LoRA step -> engine -> loop.

One optimizer step: for each of ``gradient_accumulation`` micro-batches (one batch of EVERY task),
forward, per-task losses, one backward (per-task LoRA gradients captured); then reduce per task
across ranks, project (Gram -> weights -> combined), hand to the engine, step.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from . import checkpoint as ckpt
from .batching import MultiTaskSampler
from .config import Config
from .data import load_tasks
from .evaluate import _to, evaluate
from .modeling import DTYPES, build_model, load_tokenizer
from .setup import build_engine, init_distributed, shard_for_fsdp
from .step import OrthoLoRA, StepResult
from .telemetry import Telemetry, block_summary

log = logging.getLogger("ortho_lora_dist")


class TooManySkips(RuntimeError):
    pass


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False) -> None:
        self.cfg, tc = cfg, cfg.train
        self.tasks = load_tasks(cfg.tasks)  # every data error surfaces here, before any process group or model
        self.names = [t.name for t in self.tasks]
        self.info = init_distributed(cfg)
        torch.manual_seed(tc.seed)
        self.tokenizer = load_tokenizer(cfg.model)
        fsdp_nf4 = cfg.distributed.engine == "fsdp" and cfg.model.quantization == "nf4"
        storage = DTYPES[cfg.model.dtype] if fsdp_nf4 else None  # FSDP: 4-bit storage dtype = model dtype
        self.model = build_model(cfg, self.tasks, self.tokenizer, storage)
        if cfg.model.quantization == "none":
            self.model.to(self.info.device)
        else:
            for head in getattr(self.model, "heads", []):
                head.to(self.info.device)
        if tc.gradient_checkpointing:
            peft = self.model.peft_model
            peft.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            peft.enable_input_require_grads()
        self.model.train()
        if cfg.distributed.engine == "fsdp" and self.info.world > 1:
            shard_for_fsdp(cfg, self.model)
        reduce = tc.reduce if tc.reduce != "auto" else ("eager" if self.info.world > 1 else "step")
        self.olr = OrthoLoRA(
            self.model, len(self.tasks), strategy=tc.strategy, granularity=tc.granularity, seed=tc.seed,
            mode=tc.mode, task_params=self.model.task_params(), comm=self.info.comm, reduce=reduce,
        )
        self.sampler = MultiTaskSampler(
            [len(t.splits["train"]) for t in self.tasks], tc.per_task_batch_size, tc.seed, self.info.rank, self.info.world
        )
        self.total_steps = tc.steps or math.ceil(tc.epochs * self.sampler.steps_per_epoch(tc.gradient_accumulation))
        self.engine = build_engine(cfg, self.model, self.olr, self.info, self.total_steps, tc.per_task_batch_size * len(self.tasks))
        self.loss_weights = torch.tensor([t.config.loss_weight for t in self.tasks])
        self.out = Path(cfg.output_dir)
        self.step, self.consecutive_skips, self.skipped_total = 0, 0, 0
        self.resumed = resume
        if resume:
            self._resume()
        self.telemetry = Telemetry(self.out, self.names, self.info.main, resume=self.step > 0)
        self._stop: str | None = None
        if self.info.main:
            (self.out).mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))

    # -- signals ------------------------------------------------------------------------------------------
    def _install_signals(self) -> dict:
        def handler(signum, _frame):
            self._stop = signal.Signals(signum).name

        return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGUSR1)}

    def _agree_stop(self) -> bool:
        """All ranks agree at the step boundary: stop if any rank got the signal."""
        flag = torch.tensor([1.0 if self._stop else 0.0], device=self.info.device if self.info.device.type == "cuda" else "cpu")
        if self.info.world > 1:
            import torch.distributed as dist

            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    # -- one step -------------------------------------------------------------------------------------------
    def _micro_batch(self):
        picks = self.sampler.next()
        records = [self.tasks[t].splits["train"][i] for t, i in picks]
        return _to(self.model.collate(records, [t for t, _ in picks]), self.info.device)

    def train_step(self) -> tuple[StepResult, torch.Tensor]:
        accum = self.cfg.train.gradient_accumulation
        losses = torch.zeros(len(self.tasks))
        for _ in range(accum):
            batch = self._micro_batch()
            self.olr.set_tasks(batch["task_ids"])
            task_losses = self.model.task_losses(batch)
            losses += task_losses.detach().float().cpu() / accum
            self.olr.backward(task_losses / accum, self.loss_weights)
        result = self.olr.project()
        self.engine.apply(result)
        return result, losses

    # -- loop -------------------------------------------------------------------------------------------------
    def already_finished(self) -> bool:
        done = self.out / "finished.json"
        return done.is_file() and json.loads(done.read_text()).get("step") == self.total_steps

    def train(self) -> dict:
        """Run to the end (or to a signal: SIGTERM/SIGUSR1 -> checkpoint, return); final eval results (rank 0)."""
        if self.resumed and self.already_finished():
            if self.info.main:
                log.warning("%s: this run already finished (%d steps); nothing to resume", self.out, self.total_steps)
            return {"finished": True, "step": self.total_steps}
        previous = self._install_signals()
        try:
            return self._train_loop()
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _train_loop(self) -> dict:
        from tqdm.auto import tqdm

        tc = self.cfg.train
        kinds = self.olr.layout.block_factor_kind()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.info.main, desc="train", dynamic_ncols=True)
        t0 = time.perf_counter()
        while self.step < self.total_steps:
            result, losses = self.train_step()
            self.step += 1
            if result.skipped:
                self.consecutive_skips += 1
                self.skipped_total += 1
                if self.consecutive_skips >= tc.max_consecutive_skips:
                    raise TooManySkips(
                        f"{self.consecutive_skips} optimizer steps in a row had a NaN/Inf loss or gradient (step {self.step}); "
                        "lower train.lr, enable train.max_grad_norm, or check the data"
                    )
            else:
                self.consecutive_skips = 0
            if self.step % tc.log_every == 0 or self.step == self.total_steps:
                self._log(result, losses, kinds, time.perf_counter() - t0)
                t0 = time.perf_counter()
            bar.update(1)
            if self.info.main:
                bar.set_postfix({n: f"{v:.3f}" for n, v in zip(self.names, losses.tolist())})
            if tc.eval_every and self.step % tc.eval_every == 0 and self.step < self.total_steps:
                self._log_eval(evaluate(self.model, self.tasks, "validation", self.info, tc.per_task_batch_size))
            if self._agree_stop():
                bar.close()
                self.save_checkpoint()
                if self.info.main:
                    log.warning("received %s: checkpoint written at step %d; resume with --resume", self._stop or "a stop signal", self.step)
                self.telemetry.close()
                return {"interrupted": True, "step": self.step}
            if tc.checkpoint_every and self.step % tc.checkpoint_every == 0:
                self.save_checkpoint()
        bar.close()
        return self.finish()

    def _reduced_losses(self, losses: torch.Tensor) -> torch.Tensor:
        if self.info.world > 1:
            import torch.distributed as dist

            losses = losses.to(self.info.device if self.info.device.type == "cuda" else "cpu")
            dist.all_reduce(losses)
            losses = losses.cpu() / self.info.world
        return losses

    def _log(self, result: StepResult, losses: torch.Tensor, kinds: list[str], seconds: float) -> None:
        losses = self._reduced_losses(losses)
        opt = getattr(self.engine, "optimizer", None) or self.engine.scheduler.optimizer
        record = {
            "step": self.step,
            "loss": dict(zip(self.names, [round(x, 6) for x in losses.tolist()])),
            "lr": opt.param_groups[0]["lr"],
            "grad_norm": dict(zip(self.names, [round(x, 6) for x in result.task_grad_norms.tolist()])),
            "combined_grad_norm": round(self.engine.last_grad_norm, 6),
            **{k: round(v, 6) for k, v in block_summary(result, kinds).items()},
            "skipped_steps": self.skipped_total,
            "seconds_per_step": round(seconds / self.cfg.train.log_every, 4),
        }
        self.telemetry.log(record, [round(x, 4) for x in result.conflict_rate.tolist()])

    def _log_eval(self, results: dict) -> None:
        if self.info.main and results:
            self.telemetry.log({"step": self.step, "eval": results})

    # -- end of run ----------------------------------------------------------------------------------------------
    def finish(self) -> dict:
        tc = self.cfg.train
        if self.info.main:  # a requeued job that resumes after this has nothing left to do
            (self.out / "finished.json").write_text(json.dumps({"step": self.step, "total_steps": self.total_steps}))
        results = {split: evaluate(self.model, self.tasks, split, self.info, tc.per_task_batch_size) for split in ("validation", "test")}
        results = {k: v for k, v in results.items() if v}
        self.save_adapter(self.out)
        if self.info.main:
            (self.out / "eval.json").write_text(json.dumps({"step": self.step, **results}, indent=1))
            self._log_eval(results.get("validation", {}))
            print_table(results, self.tasks)
        self.telemetry.close()
        if self.info.main and tc.plots:
            from .plots import plot_run

            plot_run(self.out)
        return results

    def save_adapter(self, where: Path) -> None:
        """adapter/ (PEFT format) + task heads and task metadata beside it (rank 0)."""
        if not self.info.main:
            return
        where.mkdir(parents=True, exist_ok=True)
        peft = self.model.peft_model
        # only the (replicated) LoRA tensors: model.state_dict() would run FSDP's collective hooks on rank 0 alone
        trainable = {n: p.detach() for n, p in peft.named_parameters() if p.requires_grad}
        peft.save_pretrained(str(where / "adapter"), state_dict=trainable)
        heads = {f"heads.{n}": p.detach().cpu().contiguous() for n, p in getattr(self.model, "heads", torch.nn.Module()).named_parameters()}
        if heads:
            save_file(heads, str(where / "adapter" / "heads.safetensors"))
        meta = {"tasks": [{"name": t.name, "type": t.config.type, "labels": t.labels} for t in self.tasks]}
        (where / "adapter" / "tasks.json").write_text(json.dumps(meta, indent=1))

    def load_adapter(self, adapter_dir: Path) -> None:
        """Load adapter weights (PEFT safetensors) and task heads saved by save_adapter."""
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model.peft_model, load_file(str(adapter_dir / "adapter_model.safetensors")))
        heads_file = adapter_dir / "heads.safetensors"
        if heads_file.is_file():
            heads = load_file(str(heads_file))
            with torch.no_grad():
                for n, p in self.model.heads.named_parameters():
                    p.copy_(heads[f"heads.{n}"])

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def _barrier(self) -> None:
        if self.info.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def save_checkpoint(self) -> None:
        import shutil

        tmp = ckpt.staging_dir(self.out, self.step)
        if self.info.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        self.save_adapter(tmp)
        ds = getattr(self.engine, "engine", None)
        if ds is not None:  # DeepSpeed: every rank writes its optimizer partition
            ds.save_checkpoint(str(tmp / "deepspeed"), tag="state")
        if self.info.main:
            state = self.engine.state_dict()
            ckpt.save_torch_state(tmp / "optimizer.pt", state)
        ckpt.save_rng(tmp / f"rng{self.info.rank}.safetensors", self.olr.order.generator.get_state())
        self._barrier()
        if self.info.main:
            ckpt.write_state(tmp, {
                "step": self.step, "sampler": self.sampler.state_dict(), "consecutive_skips": self.consecutive_skips,
                "skipped_total": self.skipped_total, "world_size": self.info.world, "config": self.cfg.model_dump(),
            })
            ckpt.publish(tmp, self.step)
        self._barrier()

    def _resume(self) -> None:
        found = ckpt.latest_checkpoint(self.out)
        if found is None:
            if self.info.main:
                log.warning("--resume: no complete checkpoint under %s/checkpoints: starting from scratch", self.out)
            return
        state = json.loads((found / ckpt.STATE).read_text())
        if state["world_size"] != self.info.world:
            raise RuntimeError(f"{found} was written by {state['world_size']} ranks; this run has {self.info.world}")
        self.load_adapter(found / "adapter")
        ds = getattr(self.engine, "engine", None)
        if ds is not None:
            ds.load_checkpoint(str(found / "deepspeed"), tag="state", load_module_strict=False)
        self.engine.load_state_dict(ckpt.load_torch_state(found / "optimizer.pt"))
        order = ckpt.load_rng(found / f"rng{self.info.rank}.safetensors")
        self.olr.order.generator.set_state(order)
        self.sampler.load_state_dict(state["sampler"])
        self.step = state["step"]
        self.consecutive_skips, self.skipped_total = state["consecutive_skips"], state["skipped_total"]
        if self.info.main:
            log.warning("resumed from %s (step %d)", found, self.step)


def print_table(results: dict, tasks) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Evaluation")
    table.add_column("task")
    table.add_column("metric")
    splits = list(results)
    for s in splits:
        table.add_column(s, justify="right")
    for t in tasks:
        table.add_row(t.name, t.config.metric, *[f"{results[s].get(t.name, float('nan')):.4f}" for s in splits])
    table.add_row("average", "", *[f"{results[s].get('average', float('nan')):.4f}" for s in splits])
    Console().print(table)
