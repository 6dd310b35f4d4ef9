"""Task data: HF datasets by id, or local JSONL / CSV files, checked before training starts.

Every record becomes {"text", "text_pair" (optional), "label"}; classification labels become class
indices over the task's label set. Any problem is one error naming the task, file, line (or row) and key.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .config import TaskConfig


class DataError(ValueError):
    """Bad task data, naming the file, line and key."""


@dataclass
class TaskData:
    name: str
    config: TaskConfig
    splits: dict[str, list[dict]] = field(default_factory=dict)  # train / validation / test
    labels: list[str] | None = None  # classification label set (index = class id)

    @property
    def num_labels(self) -> int:
        return len(self.labels) if self.labels else 1


def _decode(raw: bytes, path: Path, i: int, unit: str = "line") -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}, {unit} {i}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                        "save the file as UTF-8") from None


def _check_utf8(path: Path) -> None:
    """Name the first line that is not UTF-8 (before a CSV reader fails on it without saying where)."""
    with path.open("rb") as f:
        for i, raw in enumerate(f, 1):
            _decode(raw, path, i)


def iter_jsonl(path: Path):
    """(line number, JSON object) for every non-blank line; DataError naming the file and line otherwise."""
    with path.open("rb") as f:
        for i, raw in enumerate(f, 1):
            line = _decode(raw, path, i)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {i}: expected a JSON object, got {type(row).__name__}")
            yield i, row


def _read_jsonl(path: Path) -> list[dict]:
    return [row for _, row in iter_jsonl(path)]


def _read_file(path_str: str, task: str) -> tuple[list[dict], str]:
    path = Path(path_str)
    if not path.is_file():
        raise DataError(f"task {task!r}: data file {path} does not exist")
    if path.suffix in (".jsonl", ".json"):
        return _read_jsonl(path), "line"
    if path.suffix in (".csv", ".tsv"):
        import datasets

        _check_utf8(path)
        ds = datasets.load_dataset("csv", data_files=str(path), split="train", delimiter="\t" if path.suffix == ".tsv" else ",")
        return ds.to_list(), "row"
    raise DataError(f"task {task!r}: {path} is neither JSONL nor CSV/TSV")


def _read_hub(cfg: TaskConfig, split: str) -> list[dict]:
    import datasets

    from .modeling import hub_hint, is_unreachable

    try:
        return datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=split).to_list()
    except Exception as e:
        if not is_unreachable(e) and "offline" not in str(e).lower() and "couldn't" not in str(e).lower():
            raise
        raise DataError(f"task {cfg.name!r}: " + hub_hint("dataset", cfg.dataset).replace(
            "huggingface-cli download, or save_pretrained", "datasets' save_to_disk, or JSONL/CSV files") + " under 'files'") from None


def _records(rows: list[dict], cfg: TaskConfig, where: str, unit: str) -> list[dict]:
    out = []
    for i, row in enumerate(rows, 1):
        for key in (cfg.text_field, cfg.label_field) + ((cfg.text_pair_field,) if cfg.text_pair_field else ()):
            if key not in row or row[key] is None:
                kind = "sequence-pair field" if key == cfg.text_pair_field else "field"
                raise DataError(f"{where}, {unit} {i}: {kind} {key!r} is missing (task {cfg.name!r})")
        rec = {"text": str(row[cfg.text_field]), "label": row[cfg.label_field], "where": f"{where}, {unit} {i}"}
        if cfg.text_pair_field:
            rec["text_pair"] = str(row[cfg.text_pair_field])
        out.append(rec)
    return out


def load_task(cfg: TaskConfig) -> TaskData:
    """Read and check one task's splits; classification labels become indices."""
    data = TaskData(cfg.name, cfg)
    wanted = {"train": cfg.train_split, "validation": cfg.eval_split, "test": cfg.test_split}
    for split, hub_split in wanted.items():
        if cfg.files is not None:
            if split not in cfg.files:
                continue
            rows, unit = _read_file(cfg.files[split], cfg.name)
            where = cfg.files[split]
        else:
            if hub_split is None:
                continue
            rows, unit, where = _read_hub(cfg, hub_split), "row", f"{cfg.dataset}[{hub_split}]"
        records = _records(rows, cfg, where, unit)
        limit = cfg.max_train_samples if split == "train" else cfg.max_eval_samples
        data.splits[split] = records[:limit] if limit else records
    if not data.splits.get("train"):
        raise DataError(f"task {cfg.name!r}: the training split is empty")
    if cfg.type == "classification":
        data.labels = [str(x) for x in cfg.labels] if cfg.labels else sorted({str(r["label"]) for r in data.splits["train"]})
        index = {label: i for i, label in enumerate(data.labels)}
        for split, records in data.splits.items():
            for r in records:
                if str(r["label"]) not in index:
                    raise DataError(f"{r['where']}: label {r['label']!r} is not in the label set {data.labels} of task {cfg.name!r}")
                r["label"] = index[str(r["label"])]
        if cfg.label_words is not None:
            missing = [label for label in data.labels if label not in cfg.label_words]
            if missing:
                raise DataError(f"task {cfg.name!r}: label_words has no word for labels {missing}")
    elif cfg.type == "regression":
        for records in data.splits.values():
            for r in records:
                try:
                    r["label"] = float(r["label"])
                except (TypeError, ValueError):
                    raise DataError(f"{r['where']}: regression label {r['label']!r} is not a number") from None
                if not math.isfinite(r["label"]):
                    raise DataError(f"{r['where']}: regression label is {r['label']} (NaN/Inf labels would make every "
                                    f"step of task {cfg.name!r} skip): fix or drop the record")
    else:
        for records in data.splits.values():
            for r in records:
                r["label"] = str(r["label"])
    return data


def load_tasks(cfgs: list[TaskConfig]) -> list[TaskData]:
    return [load_task(c) for c in cfgs]
