"""A causal LM's samples as token ids: prompt + answer (+ EOS), labels on the answer, every row within max_length.

Needs only the tokenizer, so the length policy (data/lengths.py) runs on it before the model loads. Padded rows
(``collate``) and packed rows (``collate_packed``) come from the same ids, and both carry ``labelled_task_ids``
[N], the task of each labelled position in the order in which lm_head sees them (models/lm_head.py).

The training split is tokenised ONCE, when the data is prepared (``with_tokens``: rank 0, kept in the data cache
with the records): columns ``_input_ids`` / ``_labels`` (the row as training reads it, cut to max_length) and
``_length`` (the sample's full length, for the length policy). The training loop then reads ids instead of
rendering chat templates and tokenising each micro-batch; records without them (evaluation splits) are tokenised
as they come.
"""

from __future__ import annotations

import torch

from ortho_lora_dist.data.lengths import fit
from ortho_lora_dist.data.loading import Records, TaskData
from ortho_lora_dist.data.packing import pack
from ortho_lora_dist.data.prompts import bound_chars, prompt_ids
from ortho_lora_dist.data.sources import quiet_datasets
from ortho_lora_dist.models.lm_head import labelled_tasks
from ortho_lora_dist.models.prompts import Piece, Prompts
from ortho_lora_dist.runtime.progress import progress

LENGTH_CHUNK = 512  # records tokenised at a time when measuring or tokenising a split
TOKENS = ("_input_ids", "_labels")  # the training split's rows, tokenised when the data is prepared
LENGTH = "_length"  # each training sample's full length (prompt + answer + EOS) before any cut


class CausalEncoding:
    """Tokenises the records of ``tasks`` for ``tokenizer`` into rows of at most ``max_length`` tokens."""

    def __init__(self, tokenizer, tasks: list[TaskData], max_length: int) -> None:
        self.tokenizer, self.tasks, self.max_length = tokenizer, tasks, max_length
        self.prompts = Prompts(tokenizer, tasks)

    def texts(self, records: list[dict], task_ids: list[int]) -> tuple:
        """(prompts as (text, trainable) pieces, answers, EOS flags, train-on-inputs flags) of training records;
        each chat prompt rendered once."""
        P = self.prompts
        rendered = [P.render(t, r["messages"], True) if P.is_chat(t) else None for t, r in zip(task_ids, records)]
        prompts = [P.pieces(t, r, p) for t, r, p in zip(task_ids, records, rendered)]
        targets = [P.target(t, r, p) for t, r, p in zip(task_ids, records, rendered)]
        train_on_inputs = [bool(getattr(self.tasks[t].config, "train_on_inputs", False)) for t in task_ids]
        return prompts, [a for a, _ in targets], [e for _, e in targets], train_on_inputs

    def _prompt_tokens(self, prompt: str | list[Piece]) -> tuple[list[int], list[bool]]:
        """A prompt's ids (special tokens added in front; very long texts bounded in characters) and which of them
        are trainable (earlier assistant turns)."""
        pieces = [(prompt, False)] if isinstance(prompt, str) else prompt
        ids: list[int] = []
        mask: list[bool] = []
        for i, (text, trainable) in enumerate(pieces):
            if i == 0:
                piece = prompt_ids(self.tokenizer, text, 2 * self.max_length, self.max_length)
            else:
                piece = self.tokenizer(bound_chars(text, self.max_length), add_special_tokens=False)["input_ids"]
            ids += piece
            mask += [trainable] * len(piece)
        return ids, mask

    def token_ids(
        self, prompts: list, answers: list[str], eos: list[bool] | None = None
    ) -> tuple[list[list[int]], list[list[bool]], list[list[int]]]:
        """(prompt ids, their trainable mask, answer ids + EOS) per sample; a prompt is a text or (text, trainable)
        pieces (Prompts.pieces)."""
        tok = self.tokenizer
        eos = eos or [True] * len(prompts)
        end = [tok.eos_token_id] if tok.eos_token_id is not None else []
        prompt_tokens = [self._prompt_tokens(p) for p in prompts]
        a_ids = [tok(a, add_special_tokens=False)["input_ids"] + (end if e else []) for a, e in zip(answers, eos)]
        return [p for p, _ in prompt_tokens], [m for _, m in prompt_tokens], a_ids

    def _cut(self, parts: tuple, prompt_loss: list[bool]) -> tuple[list[list[int]], list[list[int]]]:
        """(ids, labels) per sample from ``token_ids``' (prompt ids, trainable mask, answer ids), cut to max_length."""
        ids, labels = [], []
        for p_ids, mask, a_ids, pl in zip(*parts, prompt_loss):
            keep_p, keep_a = fit(len(p_ids), len(a_ids), self.max_length)
            cut = len(p_ids) - keep_p
            p_ids, mask, a_ids = p_ids[cut:], mask[cut:], a_ids[:keep_a]
            ids.append(p_ids + a_ids)
            labels.append([x if pl or m else -100 for x, m in zip(p_ids, mask)] + a_ids)
        return ids, labels

    def tokenize(
        self,
        prompts: list,
        answers: list[str],
        eos: list[bool] | None = None,
        prompt_loss: list[bool] | None = None,
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Per sample: ids prompt + answer (+ EOS) cut to max_length (data/lengths.py ``fit``: the prompt's end, the
        answer's head), labels -100 on the prompt but its trainable pieces, unless ``prompt_loss``."""
        return self._cut(self.token_ids(prompts, answers, eos), prompt_loss or [False] * len(prompts))

    def rows(self, records: list[dict], task_ids: list[int]) -> tuple[list[list[int]], list[list[int]]]:
        """(ids, labels) of training records: read from their ``_input_ids`` / ``_labels`` when prepared with them
        (``with_tokens``), else tokenised now."""
        if records and all(TOKENS[0] in r for r in records):
            return [list(r[TOKENS[0]]) for r in records], [list(r[TOKENS[1]]) for r in records]
        return self.tokenize(*self.texts(records, task_ids))

    def encode(self, prompts: list[str], answers: list[str], eos=None, prompt_loss=None) -> dict:
        """Right-padded rows, one sample each: input_ids, attention_mask, labels."""
        return self._pad(*self.tokenize(prompts, answers, eos, prompt_loss))

    def _pad(self, ids: list[list[int]], labels: list[list[int]]) -> dict:
        width = max(map(len, ids))
        pad = self.tokenizer.pad_token_id
        return {
            "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            "labels": torch.tensor([y + [-100] * (width - len(y)) for y in labels]),
        }

    def collate(self, records: list[dict], task_ids: list[int]) -> dict:
        """One right-padded row per sample; ``labelled_task_ids`` [N]: the task of each labelled position."""
        enc = self._pad(*self.rows(records, task_ids))
        tasks = torch.tensor(task_ids)
        labelled = labelled_tasks(enc["labels"], tasks)
        return {**enc, "task_ids": tasks, "records": records, "labelled_task_ids": labelled}

    def collate_packed(self, records: list[dict], task_ids: list[int], one_row: bool = False) -> dict:
        """The same samples packed into rows of at most max_length tokens (``one_row``, for flash_attention_2: one
        row, no padding), attention inside each sample; ``token_task_ids`` [R, W] for the capture (data/packing.py)."""
        ids, labels = self.rows(records, task_ids)
        capacity = sum(map(len, ids)) if one_row else self.max_length
        packed = pack(ids, labels, task_ids, capacity, self.tokenizer.pad_token_id)
        tasks = labelled_tasks(packed["labels"], packed["token_task_ids"])
        return {**packed, "task_ids": torch.tensor(task_ids), "records": records, "labelled_task_ids": tasks}

    def sample_lengths(self, task: int, records) -> list[int]:
        """Token length (prompt + answer + EOS, before any cut) of every record of ``task``."""
        if isinstance(records, Records) and LENGTH in records.ds.column_names:
            return list(records.column(LENGTH))
        out: list[int] = []
        for lo in range(0, len(records), LENGTH_CHUNK):
            chunk = list(records[lo : lo + LENGTH_CHUNK])
            prompts, answers, eos, _ = self.texts(chunk, [task] * len(chunk))
            p_ids, _, a_ids = self.token_ids(prompts, answers, eos)
            out += [len(p) + len(a) for p, a in zip(p_ids, a_ids)]
        return out

    def with_tokens(self, task: int, records: Records, announce: bool = True) -> Records:
        """``records`` (a training split) with the columns ``_input_ids``, ``_labels`` (the rows training reads, cut to
        max_length) and ``_length`` (the full length before the cut), tokenised once, LENGTH_CHUNK records at a time
        into Arrow (datasets.map: never the whole split as Python lists); ``announce``: our progress line."""
        import datasets

        bar = progress(total=len(records), enabled=announce, desc=f"tokenise {self.tasks[task].name}")

        def tokenise(batch: dict) -> dict:
            keys = list(batch)
            chunk = [records._out({k: batch[k][j] for k in keys}) for j in range(len(batch[keys[0]]))]
            prompts, answers, eos, prompt_loss = self.texts(chunk, [task] * len(chunk))
            parts = self.token_ids(prompts, answers, eos)
            ids, labels = self._cut(parts, prompt_loss)
            bar.update(len(chunk))
            return {TOKENS[0]: ids, TOKENS[1]: labels, LENGTH: [len(p) + len(a) for p, _, a in zip(*parts)]}

        features = records.ds.features.copy()
        features.update({k: datasets.Sequence(datasets.Value("int32")) for k in TOKENS})
        features[LENGTH] = datasets.Value("int32")
        try:
            with quiet_datasets():
                ds = records.ds.map(
                    tokenise, batched=True, batch_size=LENGTH_CHUNK, features=features, load_from_cache_file=False
                )
        finally:
            bar.close()
        return Records(ds, records.classes)
