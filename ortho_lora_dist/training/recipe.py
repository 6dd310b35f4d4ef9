"""The training recipe: config -> data -> process group -> model -> Ortho-LoRA step -> engine -> loop.

One optimizer step (``train_step``): for each of ``gradient_accumulation`` micro-batches (one batch of EVERY
task), forward, per-task losses, one backward (per-task LoRA gradients captured); then reduce per task across
ranks, combine (Gram -> weights -> combined), hand to the engine, step. Read top to bottom:
setup -> train -> train_step -> evaluate -> save_checkpoint / load_checkpoint -> finalize -> cleanup.
"""

from __future__ import annotations

import json
import logging
import math
import time

import torch
import yaml

from ortho_lora_dist.artifacts.adapter import warm_start
from ortho_lora_dist.artifacts.card import write_model_card
from ortho_lora_dist.artifacts.plots import plot_run
from ortho_lora_dist.artifacts.write import save_adapter
from ortho_lora_dist.config import Config, eval_batch_size
from ortho_lora_dist.core.losses import step_mean_part
from ortho_lora_dist.core.step import StepResult
from ortho_lora_dist.data.cache import cache_root, prepared_tasks
from ortho_lora_dist.data.loading import TaskData, load_tasks
from ortho_lora_dist.data.sampling import MultiTaskSampler
from ortho_lora_dist.engines import engine_spec
from ortho_lora_dist.evaluation.evaluate import SPLITS, EvalResult, run_eval
from ortho_lora_dist.evaluation.report import eval_document, print_table, scores
from ortho_lora_dist.models.build import data_key, fit_tasks_to_length, load_run_model
from ortho_lora_dist.models.loading import load_tokenizer
from ortho_lora_dist.models.placement import to_device
from ortho_lora_dist.runtime import distributed as dist
from ortho_lora_dist.runtime import run_files as rf
from ortho_lora_dist.runtime.fsutil import is_write_failure
from ortho_lora_dist.runtime.progress import progress
from ortho_lora_dist.runtime.signals import StopSignals
from ortho_lora_dist.training import checkpoint as ckpt
from ortho_lora_dist.training.engine_setup import build_engine, build_ortho_lora
from ortho_lora_dist.training.halves import group_counts, halved
from ortho_lora_dist.training.log_record import NoiseWindow, eval_record, step_record
from ortho_lora_dist.training.resume import check_engine_resume, check_resume
from ortho_lora_dist.training.run_dir import RunDir
from ortho_lora_dist.training.state import TrainingFailed, TrainState
from ortho_lora_dist.training.telemetry import Telemetry

log = logging.getLogger("ortho_lora_dist")


class Trainer:
    """One training run of ``cfg`` into ``cfg.output_dir``; ``resume``: continue from its newest valid checkpoint."""

    def __init__(self, cfg: Config, resume: bool = False, halves: bool = False) -> None:
        """``halves``: capture every task's two halves apart (2T groups, joint training; study/diagnose.py)."""
        # each task's two halves captured apart: diagnose, gram debiased, noise telemetry
        self.halves = halves or cfg.train.gram == "debiased" or cfg.train.noise_every > 0
        self.cfg, self.telemetry, self.run = cfg, None, RunDir(cfg.output_dir)
        self.log_failure: Exception | None = None  # a failed metrics write, agreed on at the next step boundary
        self.stop = StopSignals()
        self.stop.install()  # while loading, a stop signal leaves at once: nothing is written yet
        try:
            self.setup(resume)
        except BaseException:
            self.cleanup()
            raise
        self.stop.loading = False

    def setup(self, resume: bool) -> None:
        cfg, tc = self.cfg, self.cfg.train
        self.run.check_path()  # before anything heavy loads
        tokenizer = load_tokenizer(cfg.model)

        def prepare() -> list[TaskData]:  # every data error surfaces here, before any process group or model
            tasks = load_tasks(cfg.tasks)
            fit_tasks_to_length(cfg, tasks, tokenizer, announce=dist.launched_rank() == 0)  # model.truncation
            return tasks

        root, first = cache_root(cfg.distributed.data_cache), dist.launched_rank() == 0
        self.tasks = prepared_tasks(cfg.tasks, prepare, root, data_key(cfg, tokenizer), preparer=first)  # once a job
        self.names = [t.name for t in self.tasks]
        self.info = dist.init_distributed(
            cfg.distributed.backend, deepspeed=engine_spec(cfg.distributed.engine).deepspeed_init
        )
        self.run.claim_everywhere(self.info, resume)
        torch.manual_seed(tc.seed)
        self.model = load_run_model(cfg, self.tasks, self.info.device, self.info.world, tokenizer)
        self.olr = build_ortho_lora(cfg, self.model, self.info, halves=self.halves)
        names, blocks = [t.name for t in self.tasks], self.olr.layout.block_names
        self.noise = NoiseWindow(tc.noise_every, names, blocks, tc.seed, self.info.main) if tc.noise_every else None
        self.group_counts: tuple[torch.Tensor, torch.Tensor] | None = None  # halves: the last step's (tokens, samples)
        sizes = [len(t.splits["train"]) for t in self.tasks]
        self.sampler = MultiTaskSampler(
            sizes,
            tc.per_task_batch_size,
            tc.seed,
            self.info.rank,
            self.info.world,
            mode=tc.task_sampling,
            temperature=tc.temperature,
            weights=[t.sampling_weight for t in cfg.tasks],
            max_epochs=[t.max_epochs for t in cfg.tasks],
        )
        self.total_steps = tc.steps or math.ceil(tc.epochs * self.sampler.steps_per_epoch(tc.gradient_accumulation))
        if self.info.main and not resume:
            log.info("%s", self.sampler.plan(self.total_steps, tc.gradient_accumulation, self.names))
        micro_batch = tc.per_task_batch_size * len(self.tasks)
        self.engine = build_engine(cfg, self.model, self.olr, self.info, self.total_steps, micro_batch)
        self.loss_weights = torch.tensor([t.config.loss_weight for t in self.tasks])
        self.state = TrainState()
        if tc.init_adapter:  # a warm start; a checkpoint found by --resume overrides it below
            warm_start(self.model, self.names, tc.init_adapter)
        if resume:
            self.load_checkpoint()

    def _stop_agreed(self) -> bool:
        """All ranks agree at the step boundary (one all-reduce): stop if any rank got a stop signal; end the run on
        every rank (exit 1, one line) if writing the logs failed on any rank (a full disk)."""
        flags = torch.tensor([self.stop.received is not None, self.log_failure is not None], dtype=torch.float32)
        stop, failed = (dist.sum_over_ranks(self.info, flags) > 0).tolist()
        if failed:
            raise ckpt.CheckpointWriteError(
                f"writing the run's logs in {self.run.path} failed ({self.log_failure or 'on another rank'}); the "
                "checkpoints are untouched: fix the cause (space, permissions), then run the same command with --resume"
            )
        return stop

    def _log(self, record: dict, blocks: dict | None = None) -> None:
        """A metrics.jsonl record (+ trackers); a failed write is kept for the next agreement (_stop_agreed)."""
        try:
            self.telemetry.log(record, blocks)
        except Exception as e:
            if not is_write_failure(e):
                raise
            self.log_failure = self.log_failure or e

    # -- the loop -----------------------------------------------------------------------------------------------
    def train(self) -> dict:
        """Run to the end (or to a signal: SIGTERM/SIGUSR1 -> checkpoint, return); final eval results (rank 0)."""
        main = self.info.main
        try:
            if self.run.finished_at() == self.total_steps == self.state.step:
                if main:
                    log.info(
                        "%s: this run already finished (%d steps, adapter and eval.json present); nothing to do",
                        self.run.path,
                        self.total_steps,
                    )
                return {"finished": True, "step": self.total_steps}
            if self._stop_agreed():  # a signal arrived after loading, before the first step
                if main:
                    why = self.stop.received or "a stop signal"
                    log.warning("received %s before training started: nothing written", why)
                return {"interrupted": True, "step": self.state.step}
            self._open_outputs()
            return self._loop()
        finally:
            self.cleanup()

    def _open_outputs(self) -> None:
        """config.yaml and blocks.json (rank 0), finished.json removed, the logs opened (truncated after a resume)."""
        if self.info.main:
            self.run.begin(yaml.safe_dump(self.cfg.model_dump(), sort_keys=False), self.olr.layout, self.names)
        resume_step = self.state.step if self.state.resumed_from else None
        self.telemetry = Telemetry(
            self.run.path,
            self.names,
            self.info.main,
            resume_step=resume_step,
            report_to=self.cfg.train.report_to,
            config=self.cfg.model_dump(),
        )

    def _loop(self) -> dict:
        tc, state = self.cfg.train, self.state
        bar = progress(total=self.total_steps, initial=state.step, enabled=self.info.main, desc="train")
        t0 = time.perf_counter()
        while state.step < self.total_steps:
            result, losses = self.train_step()
            state.count_step(result.skipped, tc.max_consecutive_skips)
            if state.step % tc.log_every == 0 or state.step == self.total_steps:
                self._log_step(result, losses, time.perf_counter() - t0)
                t0 = time.perf_counter()
            if self.noise is not None:  # train.noise_every
                grams = None if result.skipped else result.group_grams
                record = self.noise.add(state.step, grams, self.group_counts)
                if record is not None and self.telemetry is not None:
                    self._log(record)
            bar.update(1)
            if self.info.main:
                bar.set_postfix({n: f"{v:.3f}" for n, v in zip(self.names, losses.tolist())})
            if tc.eval_every and state.step % tc.eval_every == 0 and state.step < self.total_steps:
                t_eval = time.perf_counter()
                self._log_eval(self.evaluate("validation"))
                t0 += time.perf_counter() - t_eval  # seconds_per_step counts training only
            if self._stop_agreed():
                bar.close()
                self.save_checkpoint()
                if self.info.main:
                    log.warning(
                        "received %s: checkpoint written at step %d; resume with --resume",
                        self.stop.received or "a stop signal",
                        state.step,
                    )
                return {"interrupted": True, "step": state.step}
            if tc.checkpoint_every and state.step % tc.checkpoint_every == 0:
                self.save_checkpoint()
        bar.close()
        return self.finalize()

    def train_step(self) -> tuple[StepResult, torch.Tensor]:
        """One optimizer step; returns the step's result and this rank's part of the per-task losses.

        Every task's loss is the mean over ITS labelled units (answer tokens, samples) of the whole step, all
        micro-batches of all ranks: the micro-batches are drawn first, their counts all-reduced once, and each
        micro-batch backpropagates its part world * s_t / n_t (core/losses.py), so N ranks x b == 1 process x Nb and
        accumulation k x b == 1 x kb, whatever the answers' lengths."""
        collate = self.model.collate_packed if self.cfg.train.packing else self.model.collate
        batches = []
        for _ in range(self.cfg.train.gradient_accumulation):
            picks = self.sampler.next()
            records = [self.tasks[t].splits["train"][i] for t, i in picks]
            batches.append(to_device(collate(records, [t for t, _ in picks]), self.info.device))
        counts = dist.sum_over_ranks(self.info, torch.stack([self.model.task_counts(b) for b in batches]))
        step_counts = counts.sum(0)  # [T] labelled units of the whole step
        losses = torch.zeros(len(self.tasks))
        if self.halves:
            batches = [halved(b) for b in batches]
            groups = torch.stack([group_counts(self.model, b, len(self.tasks)) for b in batches]).sum(0)
            self.group_counts = tuple(dist.sum_over_ranks(self.info, groups))
        for batch, micro_counts in zip(batches, counts):
            # per token when packed; a LoRA lm_head sees the labelled positions only: their tasks
            self.olr.set_tasks(batch.get("token_task_ids", batch["task_ids"]), batch.get("labelled_task_ids"))
            sums, _ = self.model.task_loss_sums({**batch, **batch.get("tasks_of", {})})
            parts = step_mean_part(sums, step_counts, self.info.world)
            losses += parts.detach().float().cpu()
            share = micro_counts / step_counts.clamp_min(1)
            if self.halves:  # task t's loss on group 2t; the capture splits its gradient by the halves' rows
                parts = torch.stack([parts, torch.zeros_like(parts)], 1).reshape(-1)
                self.olr.backward(parts, self.loss_weights.repeat_interleave(2))
                continue
            self.olr.backward(parts, self.loss_weights, share=share)
        result = self.olr.project(self.group_counts[0] if self.halves else None)
        self.engine.apply(result)
        return result, losses

    def _log_step(self, result: StepResult, losses: torch.Tensor, seconds: float) -> None:
        record, blocks = step_record(
            self.state.step,
            self.names,
            dist.mean_over_ranks(self.info, losses),
            result,
            lr=self.engine.optimizer.param_groups[0]["lr"],
            grad_norm=self.engine.last_grad_norm,
            kinds=self.olr.layout.block_factor_kind(),
            skipped_total=self.state.skipped_total,
            seconds_per_step=seconds / self.cfg.train.log_every,
        )
        self._log(record, blocks)

    # -- evaluation ---------------------------------------------------------------------------------------------
    def evaluate(self, split: str, stop=None) -> EvalResult | None:
        """Metrics (rank 0) and per-task loss / perplexity (all-reduced) on ``split``; None when stopped."""
        return run_eval(self.model, self.tasks, split, self.info, eval_batch_size(self.cfg), should_stop=stop)

    def _log_eval(self, result: EvalResult | None) -> None:
        record = eval_record(self.state.step, result) if self.info.main and self.telemetry is not None else None
        if record is not None:
            self._log(record)

    # -- checkpoints --------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """checkpoints/step-N, written by every rank and agreed on (training/checkpoint.py: save)."""
        step, keep = self.state.step, self.cfg.train.keep_checkpoints
        self.state.last_saved_step = step
        protect = self.state.resumed_from if self.state.written_checkpoints + 1 < keep else None
        ckpt.save(
            self.run.path,
            step,
            self.info,
            lambda tmp: ckpt.write_step_files(
                tmp,
                self.info,
                self.engine,
                self.olr,
                lambda d: save_adapter(d, self.model, self.cfg, self.tasks, step, self.total_steps),
            ),
            lambda: self.state.to_checkpoint(
                self.sampler.state_dict(), self.info.world, self.names, self.cfg.model_dump()
            ),
            keep=keep,
            protect=protect,
        )
        self.state.written_checkpoints += 1

    def load_checkpoint(self) -> None:
        """The newest checkpoint whose checksums verify (rank 0 picks it), after checking the config may resume it."""
        info = self.info
        found = ckpt.pick_checkpoint(self.run.path, info)
        if found is None:
            if info.main:
                log.warning("--resume: no checkpoint under %s/%s: starting from scratch", self.run.path, rf.CHECKPOINTS)
            return
        saved = json.loads((found / ckpt.STATE).read_text())
        check_resume(saved["config"], self.cfg.model_dump(), saved["world_size"], info.world, str(found))
        check_engine_resume(engine_spec(self.cfg.distributed.engine), saved["world_size"], info.world, str(found))
        ckpt.restore(found, info, self.model, self.names, self.engine, self.olr)
        if saved["world_size"] != info.world and info.main:
            drawn = self.cfg.train.task_sampling != "equal"
            log.warning(
                "resuming a %d-rank checkpoint on %d ranks (same global batch): %s; dropout masks are drawn anew",
                saved["world_size"],
                info.world,
                "the task shares are drawn per rank, so the samples from here differ from an uninterrupted run's "
                "(the same distribution)"
                if drawn
                else "the sample sequence is the same",
            )
        self.sampler.load_state_dict(saved["sampler"])
        self.state = TrainState.from_checkpoint(saved, found)
        if info.main:
            log.info("resumed from %s (step %d)", found, self.state.step)

    # -- the end ------------------------------------------------------------------------------------------------
    def finalize(self) -> dict:
        """Final stages, each redone by a resumed run when missing: checkpoint -> adapter -> eval -> finished.json.

        finished.json is written last, so a kill anywhere before it leaves a run that --resume completes.
        """
        state, main = self.state, self.info.main
        params = self.olr.lora_params + self.olr.head_params()
        state.check_usable(dist.all_ok(self.info, all(bool(torch.isfinite(p.detach()).all()) for p in params)))
        if state.last_saved_step != state.step:  # the final checkpoint: --resume can always redo what follows
            self.save_checkpoint()

        def write_adapter() -> None:
            if main:
                save_adapter(self.run.path, self.model, self.cfg, self.tasks, state.step, self.total_steps, atomic=True)

        try:  # every rank learns of a failed write, instead of waiting in the evaluation's collectives
            ckpt.agreed(self.info, write_adapter)
        except ckpt.CheckpointWriteError as e:
            raise ckpt.CheckpointWriteError(
                f"writing the adapter in {self.run.path} failed ({e}); checkpoint step {state.step} is complete: "
                "fix the cause (space, permissions), then run the same command with --resume"
            ) from None
        if main:
            log.info(
                "trained %d steps (%d skipped); adapter saved to %s", state.step, state.skipped_total, self.run.adapter
            )
        full: dict[str, EvalResult] = {}
        for split in SPLITS:
            evaluated = self.evaluate(split, stop=self._stop_agreed)
            if evaluated is None:  # a stop signal during evaluation
                if main:
                    log.warning(
                        "received %s during the final evaluation: adapter and checkpoint are saved; "
                        "--resume redoes the evaluation",
                        self.stop.received or "a stop signal",
                    )
                return {"interrupted": True, "step": state.step}
            full[split] = evaluated
        results = scores(full, self.tasks)  # each task's metric, or its loss for metric: loss
        bad = sorted({t for split in results.values() for t, v in split.items() if v is None and t != "average"})
        if main:
            with ckpt.write_failures_end_the_run(f"writing the evaluation results in {self.run.path}"):
                self.run.write_json(rf.EVAL, eval_document({"step": state.step}, full), indent=1)
                write_model_card(self.run.adapter, {"step": state.step, **results})  # with the final evaluation
            self._log_eval(full.get("validation"))
            print_table(full, self.tasks)
            if self.cfg.train.plots:
                self.telemetry.close()  # the plots read the complete metrics.jsonl
                plot_run(self.run.path)
        if bad:
            raise TrainingFailed(
                f"non-finite model outputs in evaluation of {', '.join(bad)} (metrics reported as null "
                "in eval.json): the model diverged"
            )
        if self.log_failure is not None:  # the final evaluation's record: finished.json is not written without it
            raise ckpt.CheckpointWriteError(
                f"writing the run's logs in {self.run.path} failed ({self.log_failure}); adapter and checkpoint are "
                "saved: fix the cause (space), then run the same command with --resume"
            )
        if main:
            with ckpt.write_failures_end_the_run(f"marking {self.run.path} finished"):
                self.run.mark_finished(state.step, self.total_steps)
        return results

    def cleanup(self) -> None:
        """Close the logs, release the output-dir lock, restore the signal handlers (idempotent)."""
        if self.telemetry is not None:
            self.telemetry.close()
            self.telemetry = None
        self.run.release()
        self.stop.restore()
