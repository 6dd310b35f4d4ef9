"""``sharegpt``: ShareGPT conversations, ``conversations`` [{from, value}, ...] with ``from`` human / gpt / system
(also user / assistant, and tool-style roles read as they are), read as ``chat`` records."""

from __future__ import annotations

from dataclasses import replace

from ortho_lora_dist.data.errors import DataError
from ortho_lora_dist.data.formats.base import Row, chat_record, check_messages, require
from ortho_lora_dist.data.formats.chat import FORMAT as CHAT

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _messages(turns, where: str, key: str, task: str, answer: bool) -> list[dict]:
    if not isinstance(turns, (list, tuple)) or not turns:
        raise DataError(f"{where}: {key!r} must be a non-empty list of {{from, value}} turns (task {task!r})")
    out = []
    for j, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get("from"), str):
            raise DataError(f"{where}: {key}[{j}].from is missing or not a string (task {task!r})")
        out.append({"role": ROLES.get(t["from"], t["from"]), "content": t.get("value")})
    return check_messages(out, where, key, task, answer=answer)


def _normalise(row: Row, where: str, cfg) -> Row:
    require(row, cfg.messages_field, where, cfg.name)
    return chat_record(_messages(row[cfg.messages_field], where, cfg.messages_field, cfg.name, True))


def _predict(row: Row, where: str, task: str) -> Row:
    return {"messages": _messages(row.get("conversations"), where, "conversations", task, False)}


# the chat format (its prompt, schema, template rendering), reading ShareGPT's turns
FORMAT = replace(CHAT, name="sharegpt", normalise=_normalise, predict=_predict)
