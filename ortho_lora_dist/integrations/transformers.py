"""``transformers.Trainer`` with exact per-task LoRA gradients and any Gram strategy: ``MultiTaskTrainer``.

    trainer = MultiTaskTrainer(model=peft_model, args=TrainingArguments(...), train_dataset=ds,
                               strategy="ortho", granularity="factor", task_column="task", task_names=["a", "b"])
    trainer.train()

One optimizer step, as HF runs it, with our step inside:
  get_batch_samples   HF fetches the step's micro-batches; we count each task's labelled tokens n_t over all of
                      them (and over all ranks)
  training_step       per micro-batch: forward (labels held back, lm_head on the labelled positions only), per-task
                      loss L_t = (sum of task t's token losses) / n_t, ONE backward: per-task LoRA gradients captured
                      (summed over the step's micro-batches, L_t is the token-weighted mean over the whole step);
                      after the last micro-batch: reduce per task across ranks, combine (the strategy), write .grad
  HF as always        clipping (max_grad_norm), optimizer.step, scheduler, logging, checkpoints
Per-task losses, gradient norms and leverage are added to HF's logs (every ``report_to`` shows them); the strategy's
state is saved in each checkpoint (``ortho_lora_state.pt``) and restored by ``train(resume_from_checkpoint=...)``.

Supported: causal LMs (labels with -100 where there is no loss, as transformers' and TRL's collators make them),
one process, DDP (``torchrun`` / ``accelerate launch``; our per-task reduction replaces DDP's gradient all-reduce)
and DeepSpeed ZeRO-0/1/2 through ``TrainingArguments(deepspeed=...)`` (ONE surrogate backward per step hands ZeRO
the combined gradient; its clipping and scheduler run in its step). Refused with one error before training: a model
without trainable LoRA, a dataset without the task column, an unknown task, an invalid strategy option, fp16 (its
GradScaler would scale a backward we do not run through it), ZeRO-3 and FSDP (they shard the frozen base; use
``ortho-lora train`` with ``distributed.engine: fsdp``), and the loss-only rules (famo, initial_loss: they need
every task in every micro-batch, which HF's sampler does not ensure).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from ortho_lora_dist.core.capture import find_lora_factors
from ortho_lora_dist.core.comm import DistComm
from ortho_lora_dist.core.diagnostics import leverage
from ortho_lora_dist.core.engines.deepspeed_engine import surrogate_loss
from ortho_lora_dist.core.losses import step_mean_part
from ortho_lora_dist.core.step import OrthoLoRA
from ortho_lora_dist.core.strategies import is_loss_only
from ortho_lora_dist.integrations.tasks import TaskBalancedSampler, TaskCollator, task_index
from ortho_lora_dist.models.lm_head import labelled_tasks, labelled_token_losses

STATE_FILE = "ortho_lora_state.pt"
TASK_KEY = "ortho_lora_task_ids"  # the collated per-sample task index [B] (per token [1, N] when padding-free)


def _world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def check_training_args(args, strategy: str) -> None:
    """What MultiTaskTrainer cannot honour, refused before HF builds anything (one ValueError naming it)."""
    if is_loss_only(strategy):
        raise ValueError(
            f"MultiTaskTrainer: strategy {strategy!r} is a loss-only rule, which needs every task in every "
            "micro-batch (HF's sampler does not ensure it); use ortho-lora train, or a Gram strategy here"
        )
    if args is None:
        return
    if args.fp16:
        raise ValueError("MultiTaskTrainer: fp16 is not supported (its GradScaler); use bf16=True or fp32")
    ds_config = getattr(args, "hf_deepspeed_config", None)
    stage = ds_config.config.get("zero_optimization", {}).get("stage", 0) if ds_config is not None else 0
    if stage > 2:
        raise ValueError(
            f"MultiTaskTrainer: DeepSpeed ZeRO stage {stage} partitions the frozen base; stages 0-2 are supported "
            "(for a sharded base: `ortho-lora train` with distributed.engine: fsdp)"
        )
    if args.fsdp:
        raise ValueError(
            "MultiTaskTrainer: FSDP through HF is not supported (it would have to gather the sharded base around "
            "our capture); use DDP or DeepSpeed ZeRO-2 here, or `ortho-lora train` with distributed.engine: fsdp"
        )
    if args.n_gpu > 1:
        raise ValueError("MultiTaskTrainer: nn.DataParallel (several GPUs, one process) is not supported: torchrun")


def check_built_state(trainer) -> None:
    """What HF actually built, whichever way it was configured (TrainingArguments, or accelerate's environment:
    ``accelerate launch`` with an FSDP or DeepSpeed config sets ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED and
    their options, which TrainingArguments never shows): FSDP and ZeRO-3 shard the frozen base around our capture."""
    how = "(from TrainingArguments or accelerate's environment, e.g. `accelerate launch --config_file ...`)"
    if getattr(trainer, "is_fsdp_enabled", False):
        raise ValueError(
            f"MultiTaskTrainer: FSDP is enabled {how}; it is not supported here (it would have to gather the sharded "
            "base around our capture): use DDP or DeepSpeed ZeRO-0/1/2, or `ortho-lora train` with "
            "distributed.engine: fsdp"
        )
    if getattr(trainer, "is_deepspeed_enabled", False):
        plugin = trainer.accelerator.state.deepspeed_plugin
        stage = getattr(plugin, "zero_stage", 0) or 0
        if stage > 2:
            raise ValueError(
                f"MultiTaskTrainer: DeepSpeed ZeRO stage {stage} is enabled {how}; it partitions the frozen base: "
                "stages 0-2 are supported (for a sharded base: `ortho-lora train` with distributed.engine: fsdp)"
            )


class MultiTaskMixin:
    """The per-task step for a ``transformers.Trainer`` subclass (see the module docstring)."""

    def __init__(
        self,
        *args,
        strategy: str = "ortho",
        granularity: str = "factor",
        strategy_options: Mapping[str, Any] | None = None,
        task_column: str = "task",
        task_names: Sequence[str] | None = None,
        strategy_seed: int | None = None,
        task_balanced: bool = False,
        **kwargs,
    ) -> None:
        self.task_balanced = task_balanced
        self._check_args(kwargs.get("args", args[1] if len(args) > 1 else None), strategy)
        super().__init__(*args, **kwargs)
        check_built_state(self)
        self._setup_multitask(strategy, granularity, strategy_options, task_column, task_names, strategy_seed)

    def _check_args(self, args, strategy: str) -> None:
        check_training_args(args, strategy)

    def _setup_multitask(
        self,
        strategy: str,
        granularity: str,
        strategy_options: Mapping[str, Any] | None,
        task_column: str,
        task_names: Sequence[str] | None,
        seed: int | None,
    ) -> None:
        self._deepspeed = bool(self.args.deepspeed) or getattr(self, "is_deepspeed_enabled", False)
        if not find_lora_factors(self.model):
            raise ValueError(
                "MultiTaskTrainer: the model has no trainable LoRA factor: wrap it with peft.get_peft_model(model, "
                "LoraConfig(...)) (vanilla LoRA on linear layers)"
            )
        if self.model.get_output_embeddings() is None:
            raise ValueError("MultiTaskTrainer: the model has no output embeddings (lm_head): a causal LM is needed")
        if self.train_dataset is None:
            raise ValueError("MultiTaskTrainer: train_dataset is required")
        self.task_column = task_column
        self.task_names, index = task_index(self.train_dataset, task_column, task_names)
        self._task_of = index
        T = len(self.task_names)
        comm = DistComm() if _world() > 1 else None
        try:
            self.olr = OrthoLoRA(
                self.model,
                T,
                strategy=strategy,
                strategy_options=strategy_options,
                granularity=granularity,
                seed=self.args.seed if seed is None else seed,
                comm=comm,
            )
        except (ValueError, ImportError) as e:
            raise ValueError(f"MultiTaskTrainer: {e}") from None
        self.data_collator = TaskCollator(self.data_collator, task_column, index, TASK_KEY)
        self._step_counts = torch.zeros(T)
        self._micro_left = 0
        self._logged: dict[str, list[float]] = {}

    # -- HF's hooks -------------------------------------------------------------------------------------------
    def _get_train_sampler(self, *args, **kwargs):
        """``task_balanced``: every run of T consecutive samples holds one of each task (each task's samples
        reshuffled per pass, smaller tasks cycling), so every batch sees every task; else HF's random sampler."""
        if not self.task_balanced:
            return super()._get_train_sampler(*args, **kwargs)
        return TaskBalancedSampler([self._task_of[v] for v in self.train_dataset[self.task_column]], self.args.seed)

    def prediction_step(self, model, inputs: dict, prediction_loss_only: bool, ignore_keys=None):
        """Evaluation on an ``eval_dataset`` with the task column: the loss of every batch, and each task's token
        loss sums and counts, for ``eval_loss/TASK`` (the mean over the task's labelled tokens of the whole set)."""
        task_ids = inputs.pop(TASK_KEY, None)
        if task_ids is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        labels = inputs.pop("labels")
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, _ = labelled_token_losses(self.model, labels, **inputs)
        tasks = labelled_tasks(labels, task_ids).to(loss.device)
        T = len(self.task_names)
        sums = torch.zeros(T, dtype=torch.float64, device=loss.device).index_add(0, tasks, loss.double())
        counts = torch.bincount(tasks, minlength=T).double()
        self._eval_sums += torch.stack([sums.cpu(), counts.cpu()])
        mean = loss.mean().detach() if loss.numel() else loss.new_zeros(())
        return mean, None, None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """HF's evaluation, plus ``{prefix}_loss/TASK`` per task (token-weighted over the whole set and all ranks)."""
        self._eval_sums = torch.zeros(2, len(self.task_names), dtype=torch.float64)
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        sums = self._eval_sums
        if _world() > 1:
            sums = sums.to(self.args.device)
            torch.distributed.all_reduce(sums)
        sums = sums.cpu()
        per_task = {
            f"{metric_key_prefix}_loss/{name}": float(sums[0, t] / sums[1, t])
            for t, name in enumerate(self.task_names)
            if sums[1, t] > 0
        }
        if per_task:
            metrics.update(per_task)
            self.log(per_task)
        return metrics

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.task_column not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, self.task_column]

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        T = len(self.task_names)
        counts = torch.zeros(T, dtype=torch.float64)
        for b in batches:
            tasks = labelled_tasks(b["labels"], b[TASK_KEY])
            counts += torch.bincount(tasks.cpu(), minlength=T).double()
        if _world() > 1:
            counts = counts.to(self.args.device)
            torch.distributed.all_reduce(counts)
        self._step_counts = counts.cpu()
        self._step_loss_sums = torch.zeros(T, dtype=torch.float64)  # this rank's, for the logs
        self._micro_left = len(batches)
        self.olr.zero_grad()
        return batches, num_items

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        """One micro-batch: per-task losses (each over the step's tokens of its task), one backward; after the last
        micro-batch of the step, reduce -> combine -> .grad (HF clips and steps)."""
        with getattr(self, "maybe_activation_offload_context", None) or contextlib.nullcontext():  # TRL's, if on
            return self._multitask_micro_step(model, inputs)

    def _multitask_micro_step(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        model.train()
        inputs = self._prepare_inputs(inputs)
        task_ids = inputs.pop(TASK_KEY)
        labels = inputs.pop("labels")
        labelled = labelled_tasks(labels, task_ids)
        self.olr.set_tasks(task_ids, labelled)  # a LoRA lm_head sees the labelled positions only: their tasks
        T = len(self.task_names)
        # DDP's own all-reduce never runs: the unwrapped model's forward, our reduction (comm) instead
        with self.compute_loss_context_manager():
            loss, _ = labelled_token_losses(self.model, labels, **inputs)
        tasks = labelled.to(loss.device)
        sums = torch.zeros(T, dtype=loss.dtype, device=loss.device).index_add(0, tasks, loss)
        losses = step_mean_part(sums, self._step_counts, _world())  # mean over ranks (comm): sum_all / n_t
        self.olr.backward(losses)
        self._step_loss_sums += sums.detach().double().cpu()
        self._micro_left -= 1
        if self._micro_left == 0:
            self._finish_step()
        return losses.detach().sum()

    def _finish_step(self) -> None:
        result = self.olr.project()
        if self._deepspeed:
            self._deepspeed_step(result)
        else:
            self.olr.write_grads(result)
        sums = self._step_loss_sums
        if _world() > 1:
            sums = sums.to(self.args.device)
            torch.distributed.all_reduce(sums)
        means = sums.cpu() / self._step_counts.clamp_min(1)
        present = (self._step_counts > 0).tolist()  # a task absent from the step logs nothing (not a 0 loss)
        for name, v, g, here in zip(self.task_names, means.tolist(), result.task_grad_norms.tolist(), present):
            if here:
                self._logged.setdefault(f"loss/{name}", []).append(v)
                self._logged.setdefault(f"grad_norm/{name}", []).append(g)
        lev = leverage(result.grams, result.weights)
        self._logged.setdefault("leverage/change", []).append(float(lev["change"]))
        self._logged.setdefault("leverage/cos_joint", []).append(float(lev["cos_joint"]))
        self._logged.setdefault("skipped_steps", []).append(float(result.skipped))

    def _deepspeed_step(self, result) -> None:
        """ZeRO-2 owns the LoRA factors' gradients and optimizer state: hand it the combined gradient as ONE
        backward of the surrogate sum_f <p_f, N * combined_f> over this rank's region (zero elsewhere), whose
        gradient averaged over ranks by ZeRO's reduce-scatter is the combined gradient (core/engines/
        deepspeed_engine.py), then step it (its clipping and scheduler included). HF's optimizer.step() is a
        no-op wrapper under DeepSpeed. A skipped step (non-finite Grams, decided on every rank) steps nothing."""
        if result.skipped:
            return
        engine = self.model_wrapped
        engine.set_gradient_accumulation_boundary(is_boundary=True)  # one backward per step, whatever GAS says
        engine.backward(surrogate_loss(self.olr, result), scale_wrt_gas=False)
        engine.step()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._logged:  # a training log: add the means since the last one
            for k, vs in self._logged.items():
                logs[k] = sum(vs) if k == "skipped_steps" else sum(vs) / len(vs)
            self._logged = {}
        super().log(logs, start_time)

    # -- checkpoints ------------------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial) -> None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            os.makedirs(folder, exist_ok=True)
            state = {
                "olr": self.olr.state_dict(),
                "order_rng": self.olr.order.generator.get_state(),
                "tasks": list(self.task_names),
            }
            tmp = os.path.join(folder, STATE_FILE + ".tmp")
            torch.save(state, tmp)
            os.replace(tmp, os.path.join(folder, STATE_FILE))
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        if resume_from_checkpoint:
            path = resume_from_checkpoint
            if path is True:
                from transformers.trainer_utils import get_last_checkpoint

                path = get_last_checkpoint(self.args.output_dir)
                if path is None:
                    raise ValueError(f"resume_from_checkpoint=True: no checkpoint in {self.args.output_dir}")
            self._load_multitask_state(str(path))
            resume_from_checkpoint = path
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _load_multitask_state(self, folder: str) -> None:
        file = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(file):
            raise ValueError(
                f"{folder} has no {STATE_FILE}: it was not written by MultiTaskTrainer, so the strategy's state "
                "(task order, weighting state) cannot be restored"
            )
        state = torch.load(file, weights_only=True)
        if state["tasks"] != list(self.task_names):
            raise ValueError(f"{file}: trained with tasks {state['tasks']}, this trainer has {list(self.task_names)}")
        self.olr.load_state_dict(state["olr"])
        self.olr.order.generator.set_state(state["order_rng"])


class MultiTaskTrainer(MultiTaskMixin, Trainer):
    """``transformers.Trainer`` whose LoRA update combines exact per-task gradients with ``strategy``.

    Per-task loss: the mean over the task's labelled tokens in the optimizer step (token-weighted across gradient
    accumulation micro-batches and, under DDP, across ranks). ``train_dataset[task_column]`` holds each sample's task,
    an int index or a name of ``task_names`` (default: the sorted distinct names, or 0..max for ints).
    """
