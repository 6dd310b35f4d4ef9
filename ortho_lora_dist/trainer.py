"""The training recipe: config -> data -> process group -> model -> Ortho-LoRA step -> engine -> loop.

One optimizer step: for each of ``gradient_accumulation`` micro-batches (one batch of EVERY task),
forward, per-task losses, one backward (per-task LoRA gradients captured); then reduce per task
across ranks, project (Gram -> weights -> combined), hand to the engine, step.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
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
from .evaluate import EvalResult, _to, eval_report, run_eval
from .fsutil import atomic_write_text, replace_dir
from .leverage import leverage, pair_cosines
from .modeling import DTYPES, build_model, load_tokenizer
from .resume import ResumeMismatch, check_resume
from .runlock import RunLock, RunLocked
from .setup import build_engine, init_distributed, shard_for_fsdp
from .signals import STOP_SIGNALS, Interrupted
from .step import OrthoLoRA, StepResult
from .telemetry import Telemetry, block_summary

log = logging.getLogger("ortho_lora_dist")


class TooManySkips(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class TrainingFailed(RuntimeError):
    """The run ended without a usable model (every step skipped, non-finite weights or eval outputs)."""


class RunExists(RuntimeError):
    """output_dir already holds a run and --resume was not given."""


def _has_run(out: Path) -> str | None:
    """What in ``out`` shows a previous run (None if nothing)."""
    for name in ("finished.json", "adapter", "metrics.jsonl"):
        if (out / name).exists():
            return name
    if ckpt.checkpoint_dirs(out):
        return "checkpoints/"
    return None


class Trainer:
    """Build everything for one run. ``for_eval``: no lock, no outputs written, no resume (``ortho-lora eval``)."""

    def __init__(self, cfg: Config, resume: bool = False, for_eval: bool = False) -> None:
        self.cfg = cfg
        self.for_eval = for_eval
        self._stop: str | None = None
        self._loading = True
        self._previous_handlers = {} if for_eval else self._install_signals()
        try:
            self._build(resume)
        except BaseException:
            self.close()
            raise
        self._loading = False

    def _build(self, resume: bool) -> None:
        cfg, tc = self.cfg, self.cfg.train
        self.tasks = load_tasks(cfg.tasks)  # every data error surfaces here, before any process group or model
        self.names = [t.name for t in self.tasks]
        self.info = init_distributed(cfg)
        self.out = Path(cfg.output_dir)
        self.lock: RunLock | None = None
        if not self.for_eval:
            self._claim_output_dir(resume)
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
            base = peft.get_base_model()
            if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
                base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            peft.enable_input_require_grads()
        self.model.train()
        if cfg.distributed.engine == "fsdp" and self.info.world > 1:
            shard_for_fsdp(cfg, self.model)
        reduce = tc.reduce if tc.reduce != "auto" else ("eager" if self.info.world > 1 else "step")
        options = dict(tc.strategy_options)
        if tc.strategy == "norm_balance" and "pref_vector" not in options:  # loss weights = target norm shares
            # (a task with loss_weight 0 has g_t = 0 and gets weight 0 whatever its preference)
            options["pref_vector"] = [t.loss_weight if t.loss_weight > 0 else 1.0 for t in cfg.tasks]
        self.olr = OrthoLoRA(
            self.model, len(self.tasks), strategy=tc.strategy, strategy_options=options,
            granularity=tc.granularity, seed=tc.seed,
            mode=tc.mode, task_params=self.model.task_params(), comm=self.info.comm, reduce=reduce,
            bucket_mb=tc.bucket_mb, buffer_dtype=tc.buffer_dtype,
        )
        self.sampler = MultiTaskSampler(
            [len(t.splits["train"]) for t in self.tasks], tc.per_task_batch_size, tc.seed, self.info.rank, self.info.world,
            mode=tc.task_sampling, temperature=tc.temperature,
        )
        self.total_steps = tc.steps or math.ceil(tc.epochs * self.sampler.steps_per_epoch(tc.gradient_accumulation))
        self.engine = build_engine(cfg, self.model, self.olr, self.info, self.total_steps, tc.per_task_batch_size * len(self.tasks))
        self.loss_weights = torch.tensor([t.config.loss_weight for t in self.tasks])
        self.step, self.consecutive_skips, self.skipped_total = 0, 0, 0
        self.resumed_from: Path | None = None
        self.written_checkpoints = 0
        self.last_saved_step = -1
        self.telemetry: Telemetry | None = None
        if resume:
            self._resume()

    # -- the output directory ---------------------------------------------------------------------------
    def _all_ok(self, ok: bool) -> bool:
        """True on every rank iff ``ok`` on every rank (one collective; no-op in one process)."""
        if self.info.world == 1:
            return ok
        import torch.distributed as dist

        flag = torch.tensor([0.0 if ok else 1.0], device=self._flag_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() == 0)

    def _flag_device(self) -> torch.device:
        return self.info.device if self.info.device.type == "cuda" else torch.device("cpu")

    def _claim_output_dir(self, resume: bool) -> None:
        """Rank 0 locks output_dir (one run per directory) and refuses to train over a previous run without --resume."""
        error: Exception | None = None
        if self.info.main:
            try:
                found = _has_run(self.out)
                if found and not resume:
                    raise RunExists(
                        f"output_dir {self.out} already holds a run ({found}): pass --resume to continue it, "
                        "or choose another output_dir (nothing was changed)"
                    )
                self.lock = RunLock(self.out)
                self.lock.acquire()
            except (RunExists, RunLocked) as e:
                error = e
        if not self._all_ok(error is None):
            raise error or RunLocked(f"output_dir {self.out} cannot be used (see rank 0's error)")

    def close(self) -> None:
        """Release the output-dir lock and restore the signal handlers (idempotent)."""
        if getattr(self, "telemetry", None) is not None:
            self.telemetry.close()
            self.telemetry = None
        if getattr(self, "lock", None) is not None:
            self.lock.release()
            self.lock = None
        for sig, old in self._previous_handlers.items():
            signal.signal(sig, old)
        self._previous_handlers = {}

    # -- signals ------------------------------------------------------------------------------------------
    def _install_signals(self) -> dict:
        def handler(signum, _frame):
            self._stop = signal.Signals(signum).name
            if self._loading:  # nothing written yet: leave at once (SLURM's grace period is short)
                raise Interrupted(self._stop)

        return {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}

    def _agree_stop(self) -> bool:
        """All ranks agree at the step boundary: stop if any rank got the signal."""
        return not self._all_ok(self._stop is None)

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
        """finished.json for this many steps, with the adapter and eval.json it promises."""
        done = self.out / "finished.json"
        try:
            step = json.loads(done.read_text()).get("step")
        except (OSError, ValueError):
            return False
        complete = (self.out / "adapter" / "adapter_model.safetensors").is_file() and (self.out / "eval.json").is_file()
        return step == self.total_steps == self.step and complete

    def train(self) -> dict:
        """Run to the end (or to a signal: SIGTERM/SIGUSR1 -> checkpoint, return); final eval results (rank 0)."""
        try:
            if self.already_finished():
                if self.info.main:
                    log.warning("%s: this run already finished (%d steps, adapter and eval.json present); nothing to do",
                                self.out, self.total_steps)
                return {"finished": True, "step": self.total_steps}
            if self._agree_stop():  # a signal arrived after loading, before the first step
                if self.info.main:
                    log.warning("received %s before training started: nothing written", self._stop or "a stop signal")
                return {"interrupted": True, "step": self.step}
            if self.info.main:
                self.out.mkdir(parents=True, exist_ok=True)
                atomic_write_text(self.out / "config.yaml", yaml.safe_dump(self.cfg.model_dump(), sort_keys=False))
                (self.out / "finished.json").unlink(missing_ok=True)  # a resumed run with more steps is not finished
            self.telemetry = Telemetry(self.out, self.names, self.info.main, resume_step=self.step if self.resumed_from else None,
                                       report_to=self.cfg.train.report_to, config=self.cfg.model_dump())
            if self.info.main:  # what the conflict map's rows and columns are
                layout = self.olr.layout
                pairs = [(a, b) for i, a in enumerate(self.names) for b in self.names[i + 1 :]]
                atomic_write_text(self.out / "blocks.json", json.dumps({
                    "granularity": layout.granularity, "names": list(layout.block_names),
                    "kinds": layout.block_factor_kind(), "tasks": self.names, "pairs": pairs}))
            return self._train_loop()
        finally:
            self.close()

    def _train_loop(self) -> dict:
        from .progress import progress

        tc = self.cfg.train
        kinds = self.olr.layout.block_factor_kind()
        bar = progress(total=self.total_steps, initial=self.step, enabled=self.info.main, desc="train")
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
                self._log_eval(self._evaluate("validation"))
            if self._agree_stop():
                bar.close()
                self.save_checkpoint()
                if self.info.main:
                    log.warning("received %s: checkpoint written at step %d; resume with --resume", self._stop or "a stop signal", self.step)
                return {"interrupted": True, "step": self.step}
            if tc.checkpoint_every and self.step % tc.checkpoint_every == 0:
                self.save_checkpoint()
        bar.close()
        return self.finish()

    def _evaluate(self, split: str, stop=None) -> EvalResult | None:
        """Metrics (rank 0) and per-task loss / perplexity (all-reduced) on ``split``; None when stopped."""
        return run_eval(self.model, self.tasks, split, self.info, self.cfg.train.per_task_batch_size, should_stop=stop)

    def _reduced_losses(self, losses: torch.Tensor) -> torch.Tensor:
        if self.info.world > 1:
            import torch.distributed as dist

            losses = losses.to(self._flag_device())
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
        if not result.skipped:
            lev = leverage(result.grams, result.weights)
            record.update({
                "leverage/change": round(lev["change"], 6), "leverage/cos_joint": round(lev["cos_joint"], 6),
                "gain": dict(zip(self.names, [round(x, 6) for x in lev["gain"]])),
                "share": dict(zip(self.names, [round(x, 6) for x in lev["share"]])),
            })
        blocks = {"conflict": [round(x, 4) for x in result.conflict_rate.tolist()]}
        if not result.skipped and len(self.names) > 1:
            blocks["cos_pairs"] = [[round(x, 3) for x in row] for row in pair_cosines(result.grams).tolist()]
        self.telemetry.log(record, blocks)

    def _log_eval(self, result: EvalResult | None) -> None:
        """metrics.jsonl / TensorBoard: ``eval`` (metrics), ``eval_loss`` and ``eval_ppl`` (causal LM), per task."""
        if not self.info.main or result is None or self.telemetry is None or not (result.metrics or result.loss):
            return
        record: dict = {"step": self.step, "eval": result.metrics}
        for key, values in (("eval_loss", result.loss), ("eval_ppl", result.perplexity)):
            if values:
                record[key] = {k: None if v is None else round(v, 6) for k, v in values.items()}
        self.telemetry.log(record)

    # -- end of run ----------------------------------------------------------------------------------------------
    def _weights_finite(self) -> bool:
        params = self.olr.lora_params + self.olr.head_params()
        return self._all_ok(all(bool(torch.isfinite(p.detach()).all()) for p in params))

    def finish(self) -> dict:
        """Final stages, each redone by a resumed run when missing: checkpoint -> adapter -> eval -> finished.json.

        finished.json is written last, so a kill anywhere before it leaves a run that --resume completes.
        """
        tc = self.cfg.train
        if self.skipped_total >= self.step > 0 or not self._weights_finite():
            why = (f"all {self.step} optimizer steps were skipped (non-finite loss or gradient)" if self.skipped_total >= self.step
                   else "the final LoRA or head weights are not finite (the run diverged)")
            raise TrainingFailed(f"{why}: no adapter written; lower train.lr, set train.max_grad_norm, or check the data")
        if self.last_saved_step != self.step:  # the final checkpoint: --resume can always redo what follows
            self.save_checkpoint()
        self.save_adapter(self.out, atomic=True)
        if self.info.main:
            log.warning("trained %d steps (%d skipped); adapter saved to %s", self.step, self.skipped_total, self.out / "adapter")
        full: dict[str, EvalResult] = {}
        for split in ("validation", "test"):
            evaluated = self._evaluate(split, stop=self._agree_stop)
            if evaluated is None:  # a stop signal during evaluation
                if self.info.main:
                    log.warning("received %s during the final evaluation: adapter and checkpoint are saved; "
                                "--resume redoes the evaluation", self._stop or "a stop signal")
                return {"interrupted": True, "step": self.step}
            full[split] = evaluated
        results = {k: v.metrics for k, v in full.items() if v.metrics}
        bad = sorted({t for split in results.values() for t, v in split.items() if v is None and t != "average"})
        if self.info.main:
            atomic_write_text(self.out / "eval.json", json.dumps({"step": self.step, **eval_report(full)}, indent=1))
            self.write_model_card(results)
            self._log_eval(full.get("validation"))
            print_table(results, self.tasks)
            if tc.plots:
                from .plots import plot_run

                if self.telemetry is not None:
                    self.telemetry.close()
                    self.telemetry = None
                plot_run(self.out)
        if bad:
            raise TrainingFailed(f"non-finite model outputs in evaluation of {', '.join(bad)} (metrics reported as null "
                                 "in eval.json): the model diverged")
        if self.info.main:
            atomic_write_text(self.out / "finished.json", json.dumps({"step": self.step, "total_steps": self.total_steps}))
        return results

    def save_adapter(self, where: Path, atomic: bool = False) -> None:
        """adapter/ (PEFT format) + task heads (keyed by task name) and task metadata beside it (rank 0).

        ``atomic``: written to a staging folder and renamed over ``where/adapter``, so a kill never leaves
        half an adapter.
        """
        if not self.info.main:
            return
        where.mkdir(parents=True, exist_ok=True)
        target = where / "adapter"
        folder = where / ".adapter.tmp" if atomic else target
        if atomic:
            shutil.rmtree(folder, ignore_errors=True)
        peft = self.model.peft_model
        # only the (replicated) LoRA tensors: model.state_dict() would run FSDP's collective hooks on rank 0 alone
        trainable = {n: p.detach() for n, p in peft.named_parameters() if p.requires_grad}
        peft.save_pretrained(str(folder), state_dict=trainable)
        heads = getattr(self.model, "heads", None)
        if heads is not None:
            tensors = {
                f"heads.{self.names[int(i)]}.{rest}": p.detach().cpu().contiguous()
                for n, p in heads.named_parameters()
                for i, rest in [n.split(".", 1)]
            }
            save_file(tensors, str(folder / "heads.safetensors"))
        from .adapter import describe, make_portable
        from .card import write_model_card

        # self-describing: predict / merge need this folder alone (adapter.py lists the files)
        (folder / "tasks.json").write_text(json.dumps(describe(self.cfg, self.tasks, self.step, self.total_steps), indent=1))
        make_portable(folder, self.cfg.model)
        write_model_card(folder)  # metrics pending; finish() rewrites it after eval.json
        if atomic:
            replace_dir(folder, target)

    def load_adapter(self, adapter_dir: Path) -> None:
        """Load adapter weights (PEFT safetensors) and task heads saved by save_adapter (matched by task name)."""
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model.peft_model, load_file(str(adapter_dir / "adapter_model.safetensors")))
        from .adapter import load_heads

        heads_file = adapter_dir / "heads.safetensors"
        if heads_file.is_file():
            load_heads(self.model.heads, self.names, heads_file)

    def write_model_card(self, results: dict) -> None:
        """The adapter's README.md again, now with the final evaluation (rank 0, after eval.json)."""
        from .card import write_model_card

        write_model_card(self.out / "adapter", {"step": self.step, **results})

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def _barrier(self) -> None:
        if self.info.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def save_checkpoint(self) -> None:
        tmp = ckpt.staging_dir(self.out, self.step)
        self.last_saved_step = self.step
        if self.info.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        self.save_adapter(tmp)
        ds = getattr(self.engine, "engine", None)
        if ds is not None:  # DeepSpeed: every rank writes its optimizer partition
            ds.save_checkpoint(str(tmp / "deepspeed"), tag="state")
        if self.info.main:
            state = {**self.engine.state_dict(), "olr": self.olr.state_dict()}
            ckpt.save_torch_state(tmp / "optimizer.pt", state)
        ckpt.save_rng(tmp / f"rng{self.info.rank}.safetensors", self.olr.order.generator.get_state())
        self._barrier()
        if self.info.main:
            ckpt.write_state(tmp, {
                "step": self.step, "sampler": self.sampler.state_dict(), "consecutive_skips": self.consecutive_skips,
                "skipped_total": self.skipped_total, "world_size": self.info.world, "tasks": self.names,
                "config": self.cfg.model_dump(),
            })
            self.written_checkpoints += 1
            keep = self.cfg.train.keep_checkpoints
            protect = self.resumed_from if self.written_checkpoints < keep else None
            ckpt.publish(tmp, self.step, keep=keep, protect=protect)
        self._barrier()

    def _pick_checkpoint(self) -> Path | None:
        """Rank 0 picks the newest checkpoint whose checksums verify; every rank gets its answer."""
        found: Path | None = None
        error: str | None = None
        if self.info.main:
            try:
                found = ckpt.newest_valid(self.out)
            except ckpt.CheckpointError as e:
                error = str(e)
        if self.info.world > 1:
            import torch.distributed as dist

            box = [(str(found) if found else None, error)]
            dist.broadcast_object_list(box, src=0)
            found, error = (Path(box[0][0]) if box[0][0] else None), box[0][1]
        if error:
            raise ckpt.CheckpointError(error)
        return found

    def _resume(self) -> None:
        found = self._pick_checkpoint()
        if found is None:
            if self.info.main:
                log.warning("--resume: no checkpoint under %s/checkpoints: starting from scratch", self.out)
            return
        state = json.loads((found / ckpt.STATE).read_text())
        saved_world = state["world_size"]
        check_resume(state["config"], self.cfg.model_dump(), saved_world, self.info.world, str(found))
        if saved_world != self.info.world and self.cfg.distributed.engine == "deepspeed":
            raise ResumeMismatch(
                f"--resume: {found} was written by {saved_world} DeepSpeed ranks and this run has {self.info.world}: "
                f"ZeRO-2 partitions the optimizer state by rank, so resume it on {saved_world} ranks (its adapter/ "
                "folder is complete and can seed a new run on any number of ranks)"
            )
        self.load_adapter(found / "adapter")
        ds = getattr(self.engine, "engine", None)
        if ds is not None:  # checksums verified above: DeepSpeed's unpickling loader only sees files this run wrote
            ds.load_checkpoint(str(found / "deepspeed"), tag="state", load_module_strict=False)
        torch_state = ckpt.load_torch_state(found / "optimizer.pt")
        self.engine.load_state_dict({k: v for k, v in torch_state.items() if k != "olr"})
        if "olr" in torch_state:
            self.olr.load_state_dict(torch_state["olr"])
        rng = found / f"rng{self.info.rank}.safetensors"
        if rng.is_file():
            self.olr.order.generator.set_state(ckpt.load_rng(rng))
        else:  # more ranks than the checkpoint: the task order is the same on every rank; dropout streams are new
            torch_rng = torch.get_rng_state()
            self.olr.order.generator.set_state(ckpt.load_rng(found / "rng0.safetensors"))
            torch.set_rng_state(torch_rng)
        if saved_world != self.info.world and self.info.main:
            log.warning("resuming a %d-rank checkpoint on %d ranks (same global batch): the sample sequence is the same; "
                        "dropout masks are drawn anew", saved_world, self.info.world)
        self.sampler.load_state_dict(state["sampler"])
        self.step = state["step"]
        self.consecutive_skips, self.skipped_total = state["consecutive_skips"], state["skipped_total"]
        self.resumed_from = found
        self.last_saved_step = self.step
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
        table.add_row(t.name, t.config.metric, *[_fmt(results[s].get(t.name)) for s in splits])
    table.add_row("average", "", *[_fmt(results[s].get("average")) for s in splits])
    Console().print(table)


def _fmt(value) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"
