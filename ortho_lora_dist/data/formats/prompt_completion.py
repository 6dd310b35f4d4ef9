"""``prompt_completion``: TRL's standard prompt-completion records, ``prompt`` and ``completion`` strings; the
prompt is used verbatim (no template), the loss is on the completion (TRL's completion-only loss). Conversational
prompt-completion records (lists of messages) are ``chat`` records: use format chat."""

from __future__ import annotations

from ortho_lora_dist.data.formats.base import RecordFormat, Row, strings_schema, text_value


def _normalise(row: Row, where: str, cfg) -> Row:
    return {
        "prompt": text_value(row, cfg.prompt_field, where, cfg.name),
        "label": text_value(row, cfg.completion_field, where, cfg.name),
    }


FORMAT = RecordFormat(
    name="prompt_completion",
    generation=True,
    chat=False,
    placeholders=None,
    fields=lambda cfg: [cfg.prompt_field, cfg.completion_field],
    normalise=_normalise,
    schema=lambda cfg: strings_schema("prompt", "label"),
    predict=lambda row, where, task: {"prompt": text_value(row, "prompt", where, task)},
    prompt_text=lambda cfg, r: r["prompt"],
)
