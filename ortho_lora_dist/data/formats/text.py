"""``text``: a text (+ a second text for pair tasks) and a label: classification, regression, or a generated answer
(``type: generation``); a causal LM reads it through the task's ``prompt`` ('{text}' / '{text_pair}')."""

from __future__ import annotations

import math

from ortho_lora_dist.data.errors import DataError
from ortho_lora_dist.data.formats.base import RecordFormat, Row, require, text_value


def _fields(cfg) -> list[str]:
    return [cfg.text_field, cfg.label_field] + ([cfg.text_pair_field] if cfg.text_pair_field else [])


def _normalise(row: Row, where: str, cfg) -> Row:
    rec = {"text": text_value(row, cfg.text_field, where, cfg.name)}
    require(row, cfg.label_field, where, cfg.name)
    if cfg.text_pair_field:
        rec["text_pair"] = text_value(row, cfg.text_pair_field, where, cfg.name, "sequence-pair field")
    label = row[cfg.label_field]
    if cfg.type == "regression":
        try:
            label = float(label)
        except (TypeError, ValueError):
            raise DataError(f"{where}: regression label {label!r} is not a number") from None
        if not math.isfinite(label):
            raise DataError(
                f"{where}: regression label is {label} (NaN/Inf labels would make every "
                f"step of task {cfg.name!r} skip): fix or drop the record"
            )
    else:
        label = str(label)
    rec["label"] = label
    return rec


def _schema(cfg):
    import pyarrow as pa

    s = pa.string()
    cols = [("text", s)] + ([("text_pair", s)] if cfg.text_pair_field else [])
    return pa.schema(cols + [("label", pa.float64() if cfg.type == "regression" else s)])


def _predict(row: Row, where: str, task: str) -> Row:
    return {"text": text_value(row, "text", where, task)}


FORMAT = RecordFormat(
    name="text",
    generation=False,
    chat=False,
    placeholders=frozenset({"text", "text_pair"}),
    fields=_fields,
    normalise=_normalise,
    schema=_schema,
    predict=_predict,
    prompt_text=lambda cfg, r: cfg.prompt.format(text=r["text"], text_pair=r.get("text_pair", "")),
)
