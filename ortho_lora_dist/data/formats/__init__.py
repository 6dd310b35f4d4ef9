"""Record formats, one module each (``tasks.N.format``): text, alpaca, chat, sharegpt, prompt_completion, raw.

A new format is one new module defining ``FORMAT = RecordFormat(...)`` (base.py), added to ``FORMATS``; the config's
``format`` values, the loader, the prompts and ``ortho-lora predict`` all read it from here.
"""

from __future__ import annotations

from ortho_lora_dist.data.formats.alpaca import FORMAT as ALPACA
from ortho_lora_dist.data.formats.base import RecordFormat, check_messages, text_value
from ortho_lora_dist.data.formats.chat import FORMAT as CHAT
from ortho_lora_dist.data.formats.prompt_completion import FORMAT as PROMPT_COMPLETION
from ortho_lora_dist.data.formats.raw import FORMAT as RAW
from ortho_lora_dist.data.formats.sharegpt import FORMAT as SHAREGPT
from ortho_lora_dist.data.formats.text import FORMAT as TEXT

FORMATS: dict[str, RecordFormat] = {f.name: f for f in (TEXT, ALPACA, CHAT, SHAREGPT, PROMPT_COMPLETION, RAW)}
FORMAT_NAMES: tuple[str, ...] = tuple(FORMATS)


def get_format(name: str | None) -> RecordFormat:
    """The format called ``name`` (None, as in adapters saved before formats existed: text)."""
    return FORMATS[name or "text"]


__all__ = ["FORMATS", "FORMAT_NAMES", "RecordFormat", "check_messages", "get_format", "text_value"]
