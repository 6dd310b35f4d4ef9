"""What a record format is (``RecordFormat``), and the field checks every format shares.

A format reads a user's raw row into ONE stored record shape (an Arrow schema) and says how a causal LM prompts it.
Formats know nothing of the config classes: ``cfg`` is a task's config (``config/task.py``), read by attribute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ortho_lora_dist.data.errors import DataError

Row = dict[str, Any]


@dataclass(frozen=True)
class RecordFormat:
    """One ``tasks.N.format``.

    name:         the config value
    generation:   the answer is text (a causal-LM generation task); False: ``text``, whose label a task type reads
    chat:         rendered with the tokenizer's chat template (records hold ``messages`` and the answer ``label``)
    placeholders: the names a task's ``prompt`` may fill (None: the format takes no ``prompt``)
    fields:       cfg -> the raw fields it reads (the first missing one is named in the error)
    normalise:    (row, where, cfg) -> the stored record (DataError naming ``where`` and the field)
    schema:       cfg -> the stored record's Arrow schema
    predict:      (row, where, task name) -> the stored record of an ``ortho-lora predict`` input line, no answer
    prompt_text:  (cfg, record) -> the prompt text (None for chat formats: the chat template renders it)
    """

    name: str
    generation: bool
    chat: bool
    placeholders: frozenset[str] | None
    fields: Callable[[Any], list[str]]
    normalise: Callable[[Row, str, Any], Row]
    schema: Callable[[Any], Any]
    predict: Callable[[Row, str, str], Row]
    prompt_text: Callable[[Any, Row], str | None]


def require(row: Row, key: str, where: str, task: str, kind: str = "field") -> None:
    if key not in row or row[key] is None:
        problem = "is missing" if key not in row else "is null"
        raise DataError(f"{where}: {kind} {key!r} {problem} (task {task!r})")


def text_value(row: Row, key: str, where: str, task: str, kind: str = "field", optional: bool = False) -> str | None:
    """A text field as training and predict both read it: a string, or a number written as text (42 -> "42");
    absent or null (None when ``optional``), a boolean, list or object: DataError naming the field."""
    value = row.get(key)
    if value is None:
        if optional:
            return None
        raise DataError(f"{where}: {kind} {key!r} {'is missing' if key not in row else 'is null'} (task {task!r})")
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataError(
        f"{where}: {kind} {key!r} must be text (a string or a number), got {type(value).__name__} (task {task!r})"
    )


def check_messages(messages, where: str, key: str, task: str, answer: bool = True) -> list[dict]:
    """[{role, content}] (strings; other keys dropped); with ``answer``, the last one must be the assistant's."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError(f"{where}: {key!r} must be a non-empty list of {{role, content}} messages (task {task!r})")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(
                f"{where}: {key}[{j}] must be an object with 'role' and 'content', got {type(m).__name__} "
                f"(task {task!r})"
            )
        for k in ("role", "content"):
            if not isinstance(m.get(k), str):
                problem = "is missing" if m.get(k) is None else f"must be a string, got {type(m[k]).__name__}"
                raise DataError(f"{where}: {key}[{j}].{k} {problem} (task {task!r})")
        out.append({"role": m["role"], "content": m["content"]})
    if answer and out[-1]["role"] != "assistant":
        raise DataError(
            f"{where}: the last message of {key!r} must be the assistant's answer (role 'assistant'), got "
            f"role {out[-1]['role']!r} (task {task!r})"
        )
    return out


def chat_schema(cfg=None):
    import pyarrow as pa

    s = pa.string()
    return pa.schema([("messages", pa.list_(pa.struct([("role", s), ("content", s)]))), ("label", s)])


def chat_record(messages: list[dict]) -> Row:
    """The stored chat record: the turns before the answer, and the answer (the last, assistant's, turn)."""
    return {"messages": messages[:-1], "label": messages[-1]["content"]}


def strings_schema(*names: str):
    import pyarrow as pa

    return pa.schema([(n, pa.string()) for n in names])
