"""Shared LoRA encoder (BERT, RoBERTa, MiniLM...) with one head per task: classes (CE) or a score (MSE)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ortho_lora_dist.config import Config
from ortho_lora_dist.core.losses import task_mean, task_sum
from ortho_lora_dist.data.loading import TaskData
from ortho_lora_dist.data.prompts import bound_chars
from ortho_lora_dist.models.loading import DTYPES, attach_lora, from_pretrained, load_encoder, placement, quantization
from ortho_lora_dist.runtime.hub import resolve_model_path


class EncoderMultiTask(nn.Module):
    """Shared LoRA encoder + one head per task (classification: CE over classes; regression: MSE)."""

    def __init__(self, cfg: Config, tasks: list[TaskData], tokenizer, adapter_dir: str | Path | None = None):
        super().__init__()
        path = resolve_model_path(cfg.model.name_or_path)
        kw = dict(
            dtype=DTYPES[cfg.model.dtype],
            quantization_config=quantization(cfg.model, None),
            trust_remote_code=cfg.model.trust_remote_code,
            **placement(cfg.model),
        )
        base = from_pretrained(load_encoder, path, cfg.model.name_or_path, **kw)
        self.encoder = attach_lora(base, cfg, adapter_dir)
        hidden = base.config.hidden_size
        self.kinds = [t.config.type for t in tasks]
        if "generation" in self.kinds:
            raise ValueError("generation tasks need model.kind: causal-lm")
        self.heads = nn.ModuleList(
            nn.Linear(hidden, t.num_labels if t.config.type == "classification" else 1) for t in tasks
        )
        self.pooling, self.tokenizer, self.max_length = cfg.model.pooling, tokenizer, cfg.model.max_length

    @property
    def peft_model(self):
        return self.encoder

    def task_params(self) -> dict[int, list[nn.Parameter]]:
        return {t: list(h.parameters()) for t, h in enumerate(self.heads)}

    def collate(self, records: list[dict], task_ids: list[int]) -> dict:
        pairs = [r.get("text_pair") for r in records]
        enc = self.tokenizer(
            [bound_chars(r["text"], self.max_length) for r in records],
            [bound_chars(p, self.max_length) for p in pairs] if any(p is not None for p in pairs) else None,
            truncation=True,
            max_length=self.max_length,
            padding=True,
            return_tensors="pt",
        )
        return {**enc, "task_ids": torch.tensor(task_ids), "labels": torch.tensor([float(r["label"]) for r in records])}

    def _pooled(self, batch: dict) -> torch.Tensor:
        """Pooled encoder output. Without grad (evaluation), the last batch's is reused: predict and
        task_loss_sums on the same batch cost one forward (every rank makes the same calls, as FSDP needs)."""
        cached = self.__dict__.get("_pool_cache")
        if not torch.is_grad_enabled() and cached is not None and cached[0] is batch["input_ids"]:
            return cached[1]
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        h = self.encoder(**inputs).last_hidden_state
        if self.pooling == "cls":
            pooled = h[:, 0]
        else:
            mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
            pooled = (h * mask).sum(1) / mask.sum(1).clamp_min(1)
        self.__dict__["_pool_cache"] = None if torch.is_grad_enabled() else (batch["input_ids"], pooled)
        return pooled

    def train(self, mode: bool = True):
        self.__dict__["_pool_cache"] = None  # weights may change from here on
        return super().train(mode)

    def _per_task(self, pooled: torch.Tensor, task_ids: torch.Tensor):
        for t, head in enumerate(self.heads):
            rows = (task_ids == t).nonzero().squeeze(1)
            if rows.numel():
                yield t, rows, head(pooled.index_select(0, rows).to(head.weight.dtype))

    def _sample_losses(self, batch: dict) -> torch.Tensor:
        pooled, task_ids, labels = self._pooled(batch), batch["task_ids"], batch["labels"]
        per = torch.zeros(len(task_ids), device=pooled.device)
        for t, rows, out in self._per_task(pooled, task_ids):
            y = labels[rows].to(out.device)
            if self.kinds[t] == "classification":
                loss = F.cross_entropy(out.float(), y.long(), reduction="none")
            else:
                loss = F.mse_loss(out.float().squeeze(-1), y.float(), reduction="none")
            per = per.index_put((rows,), loss)
        return per

    def task_losses(self, batch: dict) -> torch.Tensor:
        return task_mean(self._sample_losses(batch), batch["task_ids"], len(self.heads))

    def task_counts(self, batch: dict) -> torch.Tensor:
        """Samples per task of ``batch``: [T] (no forward; the loss's denominators)."""
        return torch.bincount(batch["task_ids"].reshape(-1).cpu(), minlength=len(self.heads)).double()

    def task_loss_sums(self, batch: dict, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss sums [T], sample counts [T]) over the samples with ``keep`` (default all): mean over samples."""
        per = self._sample_losses(batch)
        w = None if keep is None else keep.to(per.device, per.dtype)
        return task_sum(per, batch["task_ids"], len(self.heads), w)

    @torch.no_grad()
    def predict(self, batch: dict, skip_tasks: frozenset[int] = frozenset()) -> list:
        """Per sample: the class index or the score (None for a non-finite output); a head is cheap, so
        ``skip_tasks`` (tasks evaluated by loss alone) are predicted all the same."""
        pooled, task_ids = self._pooled(batch), batch["task_ids"]
        preds: list = [None] * len(task_ids)
        for t, rows, out in self._per_task(pooled, task_ids):
            values = out.argmax(-1) if self.kinds[t] == "classification" else out.squeeze(-1)
            finite = torch.isfinite(out).all(-1).tolist()
            for i, v, ok in zip(rows.tolist(), values.tolist(), finite):
                preds[i] = v if ok else None  # None: a non-finite output, never scored as a prediction
        return preds
