"""Generation tasks: batched greedy decoding with LEFT padding, stop strings, and answer extraction.

Scoring a generated text against a reference goes through ``answer(task_config, text)`` on BOTH sides:

  1. extraction, one of (task config):
       ``answer_regex``      the first capture group of the first match (the whole match without groups);
                             no match: the text unchanged
       ``extract: last_number``  the last number in the text (``-12``, ``1,234``, ``3.5``); none: unchanged
       ``extract: gsm8k``    GSM8K's ``reasoning ... #### 42``: the first number after the last ``####``,
                             else (no ``####``) the last number in the text; none: unchanged
  2. normalisation (``normalize``):
       ``default``    strip, collapse runs of whitespace to one space; a text that is a number (optionally with
                      ``$``, thousands commas, a trailing ``.``) becomes its canonical form:
                      ``$1,234.50`` -> ``1234.5``, ``42.0`` -> ``42``. Case is kept (exact match stays exact for
                      free text).
       ``lowercase``  ``default``, then lower-cased
       ``strip``      leading/trailing whitespace only (the old behaviour)
       ``list``       a comma-separated list: every item stripped, inner whitespace collapsed, joined by
                      ``", "`` (``b,a`` == ``b, a``; order, case and the items' text kept: ``07`` is not ``7``)

Generation itself: prompts are tokenized like training prompts (cut from the left to ``max_length`` tokens),
LEFT-padded into one batch (a decoder-only model continues from the last real token of every row; position
ids come from the attention mask), decoded greedily (``do_sample`` off) for at most ``max_new_tokens``; a row
stops at EOS or once its text contains one of the task's ``stop`` strings, and the text is cut before the
first stop string. Batched output equals one-at-a-time output (tests/app/test_eval_generation.py).
"""

from __future__ import annotations

import copy
import re
from decimal import Decimal, InvalidOperation

import torch

from ortho_lora_dist.data.prompts import prompt_ids

NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?!\d)")
_WHOLE_NUMBER = re.compile(r"^[-+]?\$?\s*(-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+)\.?$")
EXTRACTORS = ("none", "last_number", "gsm8k")
NORMALIZERS = ("default", "lowercase", "strip", "list")


# -- extraction and normalisation ---------------------------------------------------------------------------
def _last_number(text: str) -> str | None:
    found = NUMBER.findall(text)
    return found[-1] if found else None


def extract(text: str, extractor: str = "none", regex: str | None = None) -> str:
    """The answer part of ``text`` (see the module docstring); the text unchanged when nothing matches."""
    if regex:
        m = re.search(regex, text, flags=re.DOTALL)
        if m is None:
            return text
        return m.group(1) if m.re.groups else m.group(0)
    if extractor == "last_number":
        return _last_number(text) or text
    if extractor == "gsm8k":
        if "####" in text:
            tail = text.rsplit("####", 1)[1]
            m = NUMBER.search(tail)
            return m.group(0) if m else tail
        return _last_number(text) or text
    return text


def canonical_number(text: str) -> str | None:
    """``$1,234.50`` -> ``1234.5``; None when ``text`` is not just a number."""
    m = _WHOLE_NUMBER.match(text)
    if m is None:
        return None
    try:
        d = Decimal(m.group(1).replace(",", ""))
    except InvalidOperation:
        return None
    if text.lstrip().startswith("-") and d > 0:  # "-$5"
        d = -d
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def normalize(text: str, mode: str = "default") -> str:
    text = str(text).strip()
    if mode == "strip":
        return text
    if mode == "list":
        return ", ".join(" ".join(item.split()) for item in text.split(","))
    text = " ".join(text.split())
    number = canonical_number(text)
    if number is not None:
        text = number
    return text.lower() if mode == "lowercase" else text


def answer(task_config, text) -> str:
    """Extraction then normalisation, as configured for the task (applied to predictions AND references)."""
    extractor = getattr(task_config, "extract", "none") or "none"
    regex = getattr(task_config, "answer_regex", None)
    return normalize(extract(str(text), extractor, regex), getattr(task_config, "normalize", "default") or "default")


def cut_at_stop(text: str, stops) -> str:
    """``text`` up to (not including) the earliest stop string."""
    cut = len(text)
    for s in stops or ():
        i = text.find(s)
        if s and i >= 0:
            cut = min(cut, i)
    return text[:cut]


# -- batched generation -------------------------------------------------------------------------------------
class StopOnStrings:
    """A stopping criterion: a row is done once its generated text contains a stop string (per row)."""

    def __init__(self, tokenizer, prompt_width: int, stops: list[str]) -> None:
        self.tokenizer, self.width, self.stops = tokenizer, prompt_width, [s for s in stops if s]

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        new = input_ids[:, self.width :].tolist()
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], dtype=torch.bool, device=input_ids.device)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (input_ids, attention_mask), padded on the LEFT (what generation needs)."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def encode_prompts(tokenizer, prompts: list[str], max_length: int) -> list[list[int]]:
    """Prompt token ids as in training (special tokens added), cut from the left to ``max_length`` tokens."""
    return [prompt_ids(tokenizer, p, max_length, max_length) for p in prompts]


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    max_length: int,
    max_new_tokens: int | list[int] = 32,
    stop: list[str] | None = None,
    device: torch.device | None = None,
    synced: bool = False,
) -> list[str]:
    """Greedy continuations of ``prompts`` in ONE left-padded batch (KV cache on); texts cut at the first stop string.

    ``max_new_tokens``: one limit, or one per prompt (prompts of tasks with different limits share a batch: the
    batch decodes to the largest and every row keeps its own first tokens, which greedy decoding makes the same
    as decoding it alone to its own limit). ``synced``: keep every rank stepping until all ranks are done (needed
    when the forward is collective, e.g. an FSDP-sharded base): HF's ``synced_gpus``.
    """
    from transformers import GenerationConfig

    if not prompts:
        return []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    side = getattr(tokenizer, "padding_side", "right")
    tokenizer.padding_side = (
        "left"  # for generation only (anything padding through the tokenizer meanwhile); restored below
    )
    try:
        ids, mask = left_pad(encode_prompts(tokenizer, prompts, max_length), pad)
    finally:
        tokenizer.padding_side = side
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    base = getattr(model, "generation_config", None)
    config = copy.deepcopy(base) if isinstance(base, GenerationConfig) else GenerationConfig()
    # greedy, whatever the checkpoint's generation_config says (Llama-2's samples at temperature 0.6)
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    config.update(
        max_new_tokens=max(limits),
        use_cache=True,
        max_length=None,
        do_sample=False,
        num_beams=1,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=pad,
    )
    if config.eos_token_id is None:  # the checkpoint's own list (several EOS ids in newer chat models) wins
        config.eos_token_id = tokenizer.eos_token_id
    kw = {}
    stops = [s for s in (stop or []) if s]
    if stops:
        from transformers import StoppingCriteriaList

        kw["stopping_criteria"] = StoppingCriteriaList([StopOnStrings(tokenizer, ids.shape[1], stops)])
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, synced_gpus=synced, **kw)
    new = out[:, ids.shape[1] :].tolist()
    texts = tokenizer.batch_decode([row[:limit] for row, limit in zip(new, limits)], skip_special_tokens=True)
    return [cut_at_stop(t, stops).strip() for t in texts]
