"""``ortho-lora predict``: JSONL records -> JSONL predictions, with a saved adapter directory alone.

Input: one JSON object per line, ``{"task": NAME, "text": ..., "text_pair": ... (pair tasks), "id": ... (optional)}``;
for a task of format alpaca ``"instruction"`` (+ ``"input"``) instead of ``text``, for format chat ``"messages"``
(the conversation so far, ``[{"role", "content"}, ...]``, rendered with the tokenizer's chat template).
Output: one line per input record, in input order, ``{"task", "prediction"}`` (+ ``id`` when given): the label
for classification, a number for regression; for generation the extracted, normalised answer (the task's
``answer_regex`` / ``extract`` / ``normalize``, as scored in evaluation) and the whole generated text under
``output``; ``null`` for a non-finite model output. Generation is batched (left padding, greedy).
Every record is checked before the model loads; records are batched per task; the output file appears only
complete (written to a temporary file, then renamed).
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path

import torch

from ortho_lora_dist.artifacts.adapter import find_adapter, load_adapter_model, read_meta
from ortho_lora_dist.data.errors import DataError
from ortho_lora_dist.data.formats import get_format, text_value
from ortho_lora_dist.data.sources import iter_jsonl
from ortho_lora_dist.models.placement import to_device
from ortho_lora_dist.runtime import jsonio
from ortho_lora_dist.runtime.progress import progress

# collate also encodes a training target; predict never reads it
PLACEHOLDER_LABEL = {"classification": 0, "regression": 0.0, "generation": ""}


def _record(row, where: str, tasks: dict[str, dict]) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    name = row.get("task")
    if name is None:
        raise DataError(f"{where}: field 'task' is missing (this adapter's tasks: {', '.join(tasks)})")
    if name not in tasks:
        close = difflib.get_close_matches(str(name), list(tasks), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataError(f"{where}: unknown task {name!r}{hint}; this adapter's tasks: {', '.join(tasks)}")
    task = tasks[name]
    fmt = get_format(task.get("format"))
    if fmt.name != "text":  # the format's own input fields (data/formats/): instruction, messages, prompt, ...
        rec = {"task": name, "label": PLACEHOLDER_LABEL[task["type"]], **fmt.predict(row, where, name)}
        if row.get("id") is not None:
            rec["id"] = row["id"]
        return rec
    if row.get("text_pair") is not None and not task.get("text_pair"):
        raise DataError(f"{where}: task {name!r} was trained on single texts: remove 'text_pair'")
    rec = {"task": name, "text": text_value(row, "text", where, name), "label": PLACEHOLDER_LABEL[task["type"]]}
    if task.get("text_pair"):
        rec["text_pair"] = text_value(row, "text_pair", where, name)
    if row.get("id") is not None:
        rec["id"] = row["id"]
    return rec


def read_records(path: Path, meta: dict) -> list[dict]:
    """Every record checked; one DataError naming the file and line for the first bad one."""
    if not path.is_file():
        raise DataError(f"--input {path} does not exist")
    tasks = {t["name"]: t for t in meta["tasks"]}
    return [_record(row, f"{path}, line {i}", tasks) for i, row in iter_jsonl(path)]


def _value(pred, task: dict):
    if pred is None:
        return None
    if task["type"] == "classification":
        return task["labels"][int(pred)]
    if task["type"] == "regression":
        return float(pred) if math.isfinite(pred) else None
    return str(pred)


def run_predictions(
    adapter_dir: Path, records: list[dict], batch_size: int = 32, base: str | None = None, texts: list | None = None
) -> list:
    """One prediction per record (input order), batched per task; ``texts``: filled with the generated texts."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tasks, _ = load_adapter_model(adapter_dir, base, device)
    index = {t.name: i for i, t in enumerate(tasks)}
    meta = {t["name"]: t for t in read_meta(adapter_dir)["tasks"]}
    by_task: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_task.setdefault(r["task"], []).append(i)
    preds: list = [None] * len(records)
    bar = progress(total=len(records), desc="predict")
    for name, rows in by_task.items():
        for lo in range(0, len(rows), batch_size):
            chunk = rows[lo : lo + batch_size]
            batch = to_device(model.collate([records[i] for i in chunk], [index[name]] * len(chunk)), device)
            if meta[name]["type"] == "generation":
                for i, (p, text) in zip(chunk, model.predict(batch, return_text=True)):
                    preds[i] = _value(p, meta[name])
                    if texts is not None:
                        texts[i] = text
            else:
                for i, p in zip(chunk, model.predict(batch)):
                    preds[i] = _value(p, meta[name])
            bar.update(len(chunk))
    bar.close()
    return preds


def predict_file(
    adapter: str | Path, input_path: str | Path, output_path: str | Path, batch_size: int = 32, base: str | None = None
) -> int:
    """Write ``output_path``; returns the number of predictions."""
    adapter_dir = find_adapter(adapter)
    meta = read_meta(adapter_dir)
    src, out = Path(input_path), Path(output_path)
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise FileExistsError(f"--output {out} is the input file: choose another path")
    if batch_size < 1:
        raise DataError(f"--batch-size must be at least 1 (got {batch_size})")
    records = read_records(src, meta)
    texts: list = [None] * len(records)
    preds = run_predictions(adapter_dir, records, batch_size, base, texts) if records else []
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for r, p, text in zip(records, preds, texts):
                row = {**({"id": r["id"]} if "id" in r else {}), "task": r["task"], "prediction": p}
                if text is not None:
                    row["output"] = text
                f.write(jsonio.dumps(row, ensure_ascii=False) + "\n")
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(records)
