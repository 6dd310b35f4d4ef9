"""The prompt and the answer text of a record, per task format (data/formats/), for a causal LM's tokenizer.

Chat formats: the tokenizer's own chat template (``apply_chat_template``) renders the turns before the answer with
the generation prompt; the answer is what the template writes for the assistant turn (content plus end-of-turn).
With ``train_turns: all`` the earlier assistant turns inside the prompt are trainable pieces too, found by rendering
the conversation up to each of them (a template whose rendering of a prefix is not a prefix of the whole, e.g. one
that drops earlier reasoning, falls back to the last turn, with one warning per task). A BOS the template writes is
left to the tokenizer, so it is never doubled. Other formats: the format's own prompt text.
"""

from __future__ import annotations

import logging

from ortho_lora_dist.data.formats import get_format
from ortho_lora_dist.data.loading import DataError, TaskData

log = logging.getLogger("ortho_lora_dist")
Piece = tuple[str, bool]  # (text, trainable)


class Prompts:
    """Renders the records of ``tasks`` for ``tokenizer``; errors name the task."""

    def __init__(self, tokenizer, tasks: list[TaskData]) -> None:
        self.tokenizer, self.tasks = tokenizer, tasks
        self._bos: bool | None = None
        self._warned: set[int] = set()

    def is_chat(self, task: int) -> bool:
        return get_format(getattr(self.tasks[task].config, "format", None)).chat

    def render(self, task: int, messages: list[dict], add_generation_prompt: bool) -> str:
        """The tokenizer's chat template applied to ``messages`` (text, not ids)."""
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as e:
            raise DataError(
                f"task {self.tasks[task].name!r}: the tokenizer's chat template failed on a conversation "
                f"({type(e).__name__}: {e})"
            ) from None

    def adds_bos(self) -> bool:
        """Whether tokenizing with special tokens puts BOS in front (then a BOS the chat template wrote is dropped)."""
        if self._bos is None:
            tok = self.tokenizer
            ids, bare = tok("a", add_special_tokens=True)["input_ids"], tok("a", add_special_tokens=False)["input_ids"]
            self._bos = bool(tok.bos_token) and len(ids) > len(bare) and ids[0] == tok.bos_token_id
        return self._bos

    def without_bos(self, text: str) -> str:
        bos = self.tokenizer.bos_token
        return text[len(bos) :] if self.adds_bos() and bos and text.startswith(bos) else text

    def prompt(self, task: int, r: dict, rendered: str | None = None) -> str:
        """The prompt text; tokenized WITH special tokens it gives the model's input.

        text: ``prompt`` with {text}/{text_pair}; alpaca: ``prompt`` (or Alpaca's templates) with {instruction}/{input};
        chat: ``rendered`` (the chat template's rendering of the turns before the answer), made here if not given.
        """
        cfg = self.tasks[task].config
        if self.is_chat(task):
            return self.without_bos(rendered if rendered is not None else self.render(task, r["messages"], True))
        return get_format(getattr(cfg, "format", None)).prompt_text(cfg, r)

    def pieces(self, task: int, r: dict, rendered: str | None = None) -> list[Piece]:
        """The prompt as (text, trainable) pieces: the assistant turns before the answer are trainable for a chat
        task with ``train_turns: all``; otherwise one untrainable piece."""
        text = self.prompt(task, r, rendered)
        cfg = self.tasks[task].config
        if not self.is_chat(task) or getattr(cfg, "train_turns", "last") != "all":
            return [(text, False)]
        messages, out, pos = r["messages"], [], 0
        for j, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.without_bos(self.render(task, messages[:j], True)) if j else ""
            through = self.without_bos(self.render(task, messages[: j + 1], False))
            if not (through.startswith(before) and text.startswith(through) and len(before) >= pos):
                if task not in self._warned:
                    self._warned.add(task)
                    log.warning(
                        "task %r: the chat template does not render a conversation's beginning as the beginning of "
                        "the whole; the loss covers the last assistant turn only (train_turns: last)",
                        self.tasks[task].name,
                    )
                return [(text, False)]
            out += [(text[pos : len(before)], False), (through[len(before) :], True)]
            pos = len(through)
        out.append((text[pos:], False))
        return [(t, trainable) for t, trainable in out if t]

    def answer(self, task: int, label) -> str:
        t = self.tasks[task]
        return t.config.label_words[t.labels[label]] if t.config.type == "classification" else str(label)

    def target(self, task: int, r: dict, rendered: str | None = None) -> tuple[str, bool]:
        """(answer text to train on, whether EOS follows it). Chat: what the template writes after the prompt for
        the answer turn, when rendering extends the prompt. ``rendered``: the chat prompt's rendering, if made."""
        answer = self.answer(task, r["label"])
        if self.is_chat(task):
            if rendered is None:
                rendered = self.render(task, r["messages"], add_generation_prompt=True)
            full = self.render(
                task, [*r["messages"], {"role": "assistant", "content": answer}], add_generation_prompt=False
            )
            if full.startswith(rendered) and answer in full[len(rendered) :]:
                return full[len(rendered) :], False
        return answer, True
