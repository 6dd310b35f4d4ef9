"""``raw``: plain documents for continued pre-training, one ``text`` field; the loss covers every token (BOS
excepted) and EOS. Evaluated by loss (nothing to generate). A document longer than model.max_length follows
model.truncation (``truncate`` keeps its head; pre-chunk long corpora to keep all of them)."""

from __future__ import annotations

from ortho_lora_dist.data.formats.base import RecordFormat, Row, strings_schema, text_value


def _normalise(row: Row, where: str, cfg) -> Row:
    return {"label": text_value(row, cfg.text_field, where, cfg.name)}


FORMAT = RecordFormat(
    name="raw",
    generation=True,
    chat=False,
    placeholders=None,
    fields=lambda cfg: [cfg.text_field],
    normalise=_normalise,
    schema=lambda cfg: strings_schema("label"),
    predict=lambda row, where, task: {},
    prompt_text=lambda cfg, r: "",
)
