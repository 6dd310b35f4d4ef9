"""Shared LoRA causal LM (Llama, Mistral, Qwen...): tasks as prompt -> answer text, loss on the answer tokens only;
classification by scoring each label's verbalizer, generation tasks by greedy decoding."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ortho_lora_dist.config import Config
from ortho_lora_dist.core.losses import task_mean, task_sum
from ortho_lora_dist.data.formats import get_format
from ortho_lora_dist.data.loading import DataError, TaskData
from ortho_lora_dist.models.encoding import CausalEncoding
from ortho_lora_dist.models.generation import answer, generate
from ortho_lora_dist.models.lm_head import check_packing, labelled_token_losses
from ortho_lora_dist.models.loading import DTYPES, attach_lora, from_pretrained, placement, quantization
from ortho_lora_dist.runtime.hub import resolve_model_path


def check_chat_template(tasks: list[TaskData], tokenizer, model_name: str) -> None:
    """A chat task needs the tokenizer's chat template: refuse (DataError, exit 2) naming the task and key."""
    for i, t in enumerate(tasks):
        fmt = getattr(t.config, "format", "text")
        if get_format(fmt).chat and not getattr(tokenizer, "chat_template", None):
            raise DataError(
                f"task {t.name!r} (tasks.{i}.format: {fmt}): the tokenizer of {model_name} has no chat template "
                "(tokenizer_config.json 'chat_template' / chat_template.jinja) to render its messages: use a chat or "
                "instruct model, set model.chat_template, or use format alpaca, prompt_completion or text"
            )


class CausalLMMultiTask(nn.Module):
    """Shared LoRA causal LM: tasks as prompt -> answer text, loss on the answer tokens only."""

    def __init__(
        self,
        cfg: Config,
        tasks: list[TaskData],
        tokenizer,
        quant_storage: torch.dtype | None = None,
        adapter_dir: str | Path | None = None,
    ):
        super().__init__()
        from transformers import AutoModelForCausalLM

        check_chat_template(tasks, tokenizer, cfg.model.name_or_path)  # before the (large) model loads
        path = resolve_model_path(cfg.model.name_or_path)
        base = from_pretrained(
            AutoModelForCausalLM.from_pretrained,
            path,
            cfg.model.name_or_path,
            dtype=DTYPES[cfg.model.dtype],
            quantization_config=quantization(cfg.model, quant_storage),
            trust_remote_code=cfg.model.trust_remote_code,
            **({"attn_implementation": cfg.model.attn_implementation} if cfg.model.attn_implementation else {}),
            **placement(cfg.model),
        )
        self.attn_implementation = getattr(base.config, "_attn_implementation", None) or "eager"
        if cfg.train.packing:
            check_packing(base, cfg.model.name_or_path)
        self.model = attach_lora(base, cfg, adapter_dir)
        self.tasks, self.tokenizer, self.max_length = tasks, tokenizer, cfg.model.max_length
        self.encoding = CausalEncoding(tokenizer, tasks, cfg.model.max_length)
        self.prompts = self.encoding.prompts
        for t in tasks:
            if t.config.type == "regression":
                raise ValueError(f"task {t.name!r}: regression needs model.kind: encoder-classification")
            if t.config.type == "classification" and not t.config.label_words:
                raise ValueError(f"task {t.name!r}: a classification task on a causal LM needs label_words")

    @property
    def peft_model(self):
        return self.model

    def task_params(self) -> dict[int, list[nn.Parameter]]:
        return {}

    def collate(self, records: list[dict], task_ids: list[int]) -> dict:
        """One right-padded row per sample (models/encoding.py)."""
        return self.encoding.collate(records, task_ids)

    def collate_packed(self, records: list[dict], task_ids: list[int]) -> dict:
        """The samples packed into rows of at most model.max_length tokens (models/encoding.py)."""
        return self.encoding.collate_packed(records, task_ids, self.attn_implementation == "flash_attention_2")

    def _encode(self, prompts: list[str], answers: list[str], eos=None, prompt_loss=None) -> dict:
        return self.encoding.encode(prompts, answers, eos, prompt_loss)

    def _token_losses(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(loss [N], row [N], task [N] or None without task ids) of the N labelled positions, row-major:
        -log p(label_{s+1} | tokens <= s).

        ``lm_head`` runs on those positions only (labelled_logits): never a [B, S, V] logits tensor. Packed rows
        (``position_ids``, no ``attention_mask``): a position's task is its token's, not its row's."""
        device = self.device
        inputs = {k: batch[k].to(device) for k in ("attention_mask", "position_ids") if k in batch}
        loss, keep = labelled_token_losses(
            self.model, batch["labels"].to(device), batch["input_ids"].to(device), **inputs
        )
        rows = keep.nonzero()[:, 0]
        if "token_task_ids" in batch:
            return loss, rows, batch["token_task_ids"].to(device)[:, 1:][keep]
        return loss, rows, batch["task_ids"].to(device)[rows] if "task_ids" in batch else None

    def task_losses(self, batch: dict) -> torch.Tensor:
        """L_t = mean over task t's labelled tokens of the token loss: [T] (padded or packed rows alike)."""
        loss, _, tasks = self._token_losses(batch)
        return task_mean(loss, tasks, len(self.tasks))

    def task_counts(self, batch: dict) -> torch.Tensor:
        """Labelled (answer) tokens per task of ``batch``: [T] (no forward; the loss's denominators)."""
        return torch.bincount(batch["labelled_task_ids"].cpu(), minlength=len(self.tasks)).double()

    def task_loss_sums(self, batch: dict, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss sums [T], answer-token counts [T]) over the samples with ``keep`` [B] (default all; padded rows
        only): token-weighted."""
        loss, rows, tasks = self._token_losses(batch)
        if keep is not None and "token_task_ids" in batch:
            raise ValueError("task_loss_sums: keep selects rows of a padded batch, not of packed rows")
        weight = torch.ones_like(loss) if keep is None else keep.to(loss.device, loss.dtype)[rows]
        loss = torch.where(weight > 0, loss, torch.zeros_like(loss))  # a dropped (padding) sample's NaN never leaks
        return task_sum(loss, tasks, len(self.tasks), weight)

    def row_loss_sums(self, batch: dict) -> torch.Tensor:
        """Sum of the labelled tokens' losses of every row: [B] (a verbalizer's score: lowest wins)."""
        loss, rows, _ = self._token_losses(batch)
        return torch.zeros(batch["labels"].shape[0], dtype=loss.dtype, device=loss.device).index_add(0, rows, loss)

    @torch.no_grad()
    def predict(self, batch: dict, return_text: bool = False, skip_tasks: frozenset[int] = frozenset()) -> list:
        """Per sample: the label index (classification: every label's verbalizer scored, all samples and labels in
        ONE forward) or the extracted, normalised answer (generation: one left-padded greedy batch per set of stop
        strings, tasks mixed; see generation.py). None for a non-finite score.
        ``return_text``: (prediction, generated text or None) pairs. ``skip_tasks``: generate nothing for these
        (None: evaluation by loss alone).
        """
        task_ids, records = batch["task_ids"].tolist(), batch["records"]
        preds: list = [None] * len(records)
        texts: list = [None] * len(records)
        scored = [i for i, t in enumerate(task_ids) if self.tasks[t].config.type == "classification"]
        if scored:  # every (sample, label word) pair as one row: sum of the answer tokens' losses, lowest wins
            prompts, words = [], []
            for i in scored:
                task = self.tasks[task_ids[i]]
                prompt = self.prompts.prompt(task_ids[i], records[i])
                for label in task.labels:
                    prompts.append(prompt)
                    words.append(task.config.label_words[label])
            scores = self.row_loss_sums(self._encode(prompts, words)).tolist()
            k = 0
            for i in scored:
                n = len(self.tasks[task_ids[i]].labels)
                mine = torch.tensor(scores[k : k + n])
                preds[i] = int(mine.argmin()) if bool(torch.isfinite(mine).all()) else None
                k += n
        synced = (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        )
        groups: dict[tuple[str, ...], list[int]] = {}  # one generate call per set of stop strings, tasks mixed
        for i, t in enumerate(task_ids):
            if self.tasks[t].config.type == "generation" and t not in skip_tasks:
                groups.setdefault(tuple(self.tasks[t].config.generation.stop), []).append(i)
        for stop, rows in groups.items():
            configs = [self.tasks[task_ids[i]].config for i in rows]
            out = generate(
                self.model,
                self.tokenizer,
                [self.prompts.prompt(task_ids[i], records[i]) for i in rows],
                self.max_length,
                [c.generation.max_new_tokens for c in configs],
                list(stop),
                self.device,
                synced,
            )
            for i, cfg, text in zip(rows, configs, out):
                preds[i], texts[i] = answer(cfg, text), text
        return list(zip(preds, texts)) if return_text else preds

    @property
    def device(self) -> torch.device:
        trainable = next((p for p in self.parameters() if p.requires_grad), None)  # none in a loaded, frozen adapter
        return (trainable if trainable is not None else next(self.parameters())).device
