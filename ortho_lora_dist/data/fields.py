"""Checking and normalising one record: the fields its format needs, text values, chat messages, labels."""

import math

from ortho_lora_dist.config import TaskConfig
from ortho_lora_dist.data.errors import DataError


def _needed(cfg: TaskConfig) -> list[str]:
    if cfg.format == "alpaca":
        return [cfg.instruction_field, cfg.input_field, cfg.output_field]
    if cfg.format == "chat":
        return [cfg.messages_field]
    return [cfg.text_field, cfg.label_field] + ([cfg.text_pair_field] if cfg.text_pair_field else [])


def _missing(row: dict, key: str, where: str, cfg: TaskConfig, kind: str = "field") -> None:
    if key not in row or row[key] is None:
        problem = "is missing" if key not in row else "is null"
        raise DataError(f"{where}: {kind} {key!r} {problem} (task {cfg.name!r})")


def text_value(row: dict, key: str, where: str, task: str, kind: str = "field", optional: bool = False) -> str | None:
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


def _normalise(row: dict, where: str, cfg: TaskConfig) -> dict:
    if cfg.format == "chat":
        _missing(row, cfg.messages_field, where, cfg)
        messages = check_messages(row[cfg.messages_field], where, cfg.messages_field, cfg.name)
        return {"messages": messages[:-1], "label": messages[-1]["content"]}
    if cfg.format == "alpaca":
        instruction = text_value(row, cfg.instruction_field, where, cfg.name)
        output = text_value(row, cfg.output_field, where, cfg.name)
        given = text_value(row, cfg.input_field, where, cfg.name, optional=True)
        return {"instruction": instruction, "input": given or "", "label": output}
    rec = {"text": text_value(row, cfg.text_field, where, cfg.name)}
    _missing(row, cfg.label_field, where, cfg)
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
