"""Prompt templates and prompt tokenisation shared by training, scoring and generation."""

from __future__ import annotations

from ortho_lora_dist.data.formats.alpaca import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT  # noqa: F401 (re-exported)

CHARS_PER_TOKEN_BOUND = 50  # texts are cut to max_length * this many characters before tokenizing


def bound_chars(text: str, max_length: int, keep_end: bool = False) -> str:
    """Cut very long texts before the tokenizer sees them (tokenizing 5 MB to keep 128 tokens takes seconds)."""
    limit = max_length * CHARS_PER_TOKEN_BOUND
    if len(text) <= limit:
        return text
    return text[-limit:] if keep_end else text[:limit]


def prompt_ids(tokenizer, prompt: str, keep: int, max_length: int) -> list[int]:
    """The prompt's token ids as the model sees them (special tokens added), cut from the LEFT to ``keep`` tokens.

    ``max_length`` bounds the characters tokenised (bound_chars), so a 5 MB text costs no seconds.
    """
    ids = tokenizer(bound_chars(prompt, max_length, keep_end=True), add_special_tokens=True)["input_ids"]
    return ids[-keep:]
