"""``chat``: OpenAI-style ``messages`` [{role, content}, ...] whose last turn is the assistant's answer, rendered with
the tokenizer's chat template (``model.chat_template`` overrides it); the loss covers every assistant turn
(``train_turns: all``, as TRL's assistant-only loss and axolotl's ``roles_to_train`` do) or the last one."""

from __future__ import annotations

from ortho_lora_dist.data.formats.base import RecordFormat, Row, chat_record, chat_schema, check_messages, require


def _normalise(row: Row, where: str, cfg) -> Row:
    require(row, cfg.messages_field, where, cfg.name)
    return chat_record(check_messages(row[cfg.messages_field], where, cfg.messages_field, cfg.name))


def _predict(row: Row, where: str, task: str) -> Row:
    return {"messages": check_messages(row.get("messages"), where, "messages", task, answer=False)}


FORMAT = RecordFormat(
    name="chat",
    generation=True,
    chat=True,
    placeholders=None,
    fields=lambda cfg: [cfg.messages_field],
    normalise=_normalise,
    schema=chat_schema,
    predict=_predict,
    prompt_text=lambda cfg, r: None,
)
