"""Task data, checked before training starts, kept in Arrow (never as Python lists of the whole set).

Sources (``files`` per split, or ``dataset``): JSONL (``.jsonl``, or ``.json`` holding one object per line), a JSON
array (``.json`` whose top level is a list), CSV / TSV, Parquet, a ``save_to_disk`` folder (``load_from_disk``; a
DatasetDict gives its split of the configured name) and Hub datasets (``datasets.load_dataset``).

Record formats (``format``), normalised to these columns:
  text    ``text_field`` (+ ``text_pair_field``), ``label_field``  ->  {"text", "text_pair"?, "label"}
  alpaca  ``instruction_field``, ``input_field`` (optional), ``output_field``  ->  {"instruction", "input", "label"}
  chat    ``messages_field``: [{role, content}, ...] ending with the assistant's answer  ->
          {"messages": the turns before it, "label": its content}
Classification labels become class indices over the task's label set (when a record is read).

One pass per split reads the source (JSONL line by line with the strict reader below; the others batch by batch
through ``datasets``), checks every record and writes the normalised records to an Arrow file in a temporary
folder (removed at exit); each split is then a memory-mapped ``datasets.Dataset`` behind ``Records``, read per
index. Any problem is one DataError naming the task, file, line (or row) and key.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ortho_lora_dist.config import TaskConfig
from ortho_lora_dist.runtime.hub import hub_hint, is_unreachable

TABLE_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".json": "json"}
CHUNK = 4096  # records per Arrow batch written / read while checking


class DataError(ValueError):
    """Bad task data, naming the file, line and key."""


class Records(Sequence):
    """One split: normalised records in a memory-mapped ``datasets.Dataset``; ``records[i]`` is a fresh dict.

    ``classes`` (classification) maps a label string to its class index, applied as records are read.
    """

    def __init__(self, ds, classes: dict[str, int] | None = None) -> None:
        self.ds, self.classes = ds, classes

    def __len__(self) -> int:
        return len(self.ds)

    def _out(self, r: dict) -> dict:
        if self.classes is not None:
            r["label"] = self.classes[r["label"]]
        return r

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.select(range(len(self))[i])
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} of {len(self)}")
        return self._out(self.ds[i])

    def __iter__(self) -> Iterator[dict]:
        for batch in self.ds.iter(batch_size=CHUNK):
            keys = list(batch)
            for j in range(len(batch[keys[0]])):
                yield self._out({k: batch[k][j] for k in keys})

    def select(self, indices) -> Records:
        return Records(self.ds.select(list(indices)), self.classes)

    def column(self, name: str) -> list:
        """One column of the whole split (e.g. the labels for a metric), class indices for classification labels."""
        values = self.ds[name]
        values = list(values) if not isinstance(values, list) else values
        return [self.classes[v] for v in values] if name == "label" and self.classes is not None else values


@dataclass
class TaskData:
    name: str
    config: TaskConfig
    splits: dict[str, Records] = field(default_factory=dict)  # train / validation / test
    labels: list[str] | None = None  # classification label set (index = class id)

    @property
    def num_labels(self) -> int:
        return len(self.labels) if self.labels else 1


# -- reading ----------------------------------------------------------------------------------------------------
def _decode(raw: bytes, path: Path, i: int, unit: str = "line") -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}, {unit} {i}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
            "save the file as UTF-8"
        ) from None


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
            if i == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark (Windows editors write one)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {i}: expected a JSON object, got {type(row).__name__}")
            yield i, row


def _is_json_array(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def _iter_table(ds, where: str, needed: list[str]) -> Iterator[tuple[str, dict]]:
    """("WHERE, row N", row) for every row of a datasets.Dataset, reading only the needed columns, in batches."""
    present = [c for c in needed if c in ds.column_names]
    if not present:  # none of the fields: the first row reports the first missing one
        for i in range(len(ds)):
            yield f"{where}, row {i + 1}", {}
        return
    i = 0
    for batch in ds.select_columns(present).iter(batch_size=CHUNK):
        for j in range(len(batch[present[0]])):
            i += 1
            yield f"{where}, row {i}", {k: batch[k][j] for k in present}


@contextlib.contextmanager
def _quiet_datasets():
    """datasets' own progress bars and ERROR log lines off while we read (our errors say what failed, once);
    ORTHO_LORA_VERBOSE=1 keeps them."""
    import datasets

    if os.environ.get("ORTHO_LORA_VERBOSE"):
        yield
        return
    bars = datasets.utils.is_progress_bar_enabled()
    level = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def _check_json_array(path: Path) -> None:
    """A .json array: every element an object; DataError naming the line (bad JSON) or the row, from 1, otherwise."""
    text = _decode(path.read_bytes(), path, 1, "file")
    try:
        rows = json.loads(text.lstrip("\ufeff"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {e.lineno}: not valid JSON ({e.msg})") from None
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise DataError(f"{path}, row {i}: expected a JSON object, got {type(row).__name__}")


def _load_table(path: Path, task: str):
    import datasets

    kind = TABLE_SUFFIXES[path.suffix]
    if kind == "csv":
        _check_utf8(path)
    if kind == "json":
        _check_json_array(path)
    kw = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
    try:
        with _quiet_datasets():
            return datasets.load_dataset(kind, data_files=str(path), split="train", **kw)
    except Exception as e:  # a malformed file: say which, with the reader's own words
        raise DataError(
            f"task {task!r}: {path} could not be read as {path.suffix[1:].upper()} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def _from_disk(path: Path, split_name: str, task: str):
    import datasets

    try:
        with _quiet_datasets():
            ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(
            f"task {task!r}: {path} is a folder but not one written by datasets' save_to_disk ({e})"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split_name not in ds:
            raise DataError(f"task {task!r}: {path} has no split {split_name!r} (it has: {', '.join(ds)})")
        ds = ds[split_name]
    return ds


def _rows_of_file(path_str: str, cfg: TaskConfig, split_name: str, needed: list[str]) -> Iterator[tuple[str, dict]]:
    path = Path(path_str)
    if path.is_dir():
        return _iter_table(_from_disk(path, split_name, cfg.name), str(path), needed)
    if not path.is_file():
        raise DataError(f"task {cfg.name!r}: data file {path} does not exist")
    if not path.read_bytes()[:4096].strip(b"\xef\xbb\xbf \t\r\n"):
        raise DataError(f"task {cfg.name!r}: data file {path} is empty")
    if path.suffix == ".jsonl" or (path.suffix == ".json" and not _is_json_array(path)):
        return ((f"{path}, line {i}", row) for i, row in iter_jsonl(path))
    if path.suffix in TABLE_SUFFIXES:
        return _iter_table(_load_table(path, cfg.name), str(path), needed)
    raise DataError(f"task {cfg.name!r}: {path} is not JSONL, JSON, CSV/TSV, Parquet or a save_to_disk folder")


def _hub_dataset(cfg: TaskConfig, split: str):
    import datasets

    local = Path(cfg.dataset)
    if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
        return _from_disk(local, split, cfg.name)
    try:
        with _quiet_datasets():
            return datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=split)
    except Exception as e:
        if not is_unreachable(e) and "offline" not in str(e).lower() and "couldn't" not in str(e).lower():
            raise
        raise DataError(
            f"task {cfg.name!r}: "
            + hub_hint("dataset", cfg.dataset).replace(
                "huggingface-cli download, or save_pretrained", "datasets' save_to_disk, or JSONL/CSV files"
            )
            + " under 'files'"
        ) from None


# -- checking and normalising one record ---------------------------------------------------------------------------
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


def _schema(cfg: TaskConfig):
    import pyarrow as pa

    s = pa.string()
    if cfg.format == "chat":
        return pa.schema([("messages", pa.list_(pa.struct([("role", s), ("content", s)]))), ("label", s)])
    if cfg.format == "alpaca":
        return pa.schema([("instruction", s), ("input", s), ("label", s)])
    cols = [("text", s)] + ([("text_pair", s)] if cfg.text_pair_field else [])
    return pa.schema(cols + [("label", pa.float64() if cfg.type == "regression" else s)])


_TMP: list[Path] = []


def _scratch() -> Path:
    """This process's folder of normalised Arrow files (removed at exit)."""
    if not _TMP:
        _TMP.append(Path(tempfile.mkdtemp(prefix="ortho-lora-data-")))
        atexit.register(shutil.rmtree, _TMP[0], True)
    return _TMP[0]


def _write(
    rows: Iterator[tuple[str, dict]],
    cfg: TaskConfig,
    limit: int | None,
    check: Callable[[dict, str], None] | None = None,
    seen: set | None = None,
):
    """Check + normalise every row (up to ``limit``) into an Arrow file; the memory-mapped datasets.Dataset of it."""
    import datasets
    import pyarrow as pa

    schema = _schema(cfg)
    path = _scratch() / f"{cfg.name}-{uuid.uuid4().hex}.arrow"
    chunk: list[dict] = []
    n = 0
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, schema) as w:
        for where, row in rows:
            if limit is not None and n >= limit:
                break
            rec = _normalise(row, where, cfg)
            if check is not None:
                check(rec, where)
            if seen is not None:
                seen.add(rec["label"])
            chunk.append(rec)
            n += 1
            if len(chunk) == CHUNK:
                w.write_table(pa.Table.from_pylist(chunk, schema=schema))
                chunk = []
        w.write_table(pa.Table.from_pylist(chunk, schema=schema))
    return datasets.Dataset.from_file(str(path))


def _label_check(label_set: list[str], task: str) -> Callable[[dict, str], None]:
    known = set(label_set)

    def check(rec: dict, where: str) -> None:
        if rec["label"] not in known:
            raise DataError(f"{where}: label {rec['label']!r} is not in the label set {label_set} of task {task!r}")

    return check


def split_validation(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train rows, validation rows), both in file order: a seeded permutation's first round(n * fraction) rows."""
    import torch

    k = max(1, round(n * fraction))
    if k >= n:
        raise ValueError(f"validation_fraction {fraction} of {n} records leaves no training records")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[k:]), sorted(perm[:k])


def load_task(cfg: TaskConfig) -> TaskData:
    """Read and check one task's splits (train first: it defines the default label set)."""
    data = TaskData(cfg.name, cfg)
    wanted = {"train": cfg.train_split, "validation": cfg.eval_split, "test": cfg.test_split}
    if cfg.validation_fraction is not None:
        wanted.pop("validation")
    needed = _needed(cfg)
    classification = cfg.type == "classification"
    label_set = [str(x) for x in cfg.labels] if classification and cfg.labels else None
    for split, hub_split in wanted.items():
        if cfg.files is not None:
            if split not in cfg.files:
                continue
            rows = _rows_of_file(cfg.files[split], cfg, hub_split or split, needed)
        else:
            if hub_split is None:
                continue
            ds = _hub_dataset(cfg, hub_split)
            rows = _iter_table(ds, f"{cfg.dataset}[{hub_split}]", needed)
        check = _label_check(label_set, cfg.name) if label_set is not None else None
        limit = cfg.max_train_samples if split == "train" else cfg.max_eval_samples
        if split == "train" and cfg.validation_fraction is not None:
            limit = None  # the whole file is split first; the limits apply to the two parts
        seen: set | None = set() if classification and split == "train" and label_set is None else None
        data.splits[split] = Records(_write(rows, cfg, limit, check, seen))
        if seen is not None:
            label_set = sorted(seen)
    if not data.splits.get("train"):
        raise DataError(f"task {cfg.name!r}: the training split is empty")
    if cfg.validation_fraction is not None:
        try:
            train_rows, val_rows = split_validation(
                len(data.splits["train"]), cfg.validation_fraction, cfg.validation_seed
            )
        except ValueError as e:
            raise DataError(f"task {cfg.name!r}: {e}") from None
        full = data.splits["train"]
        data.splits["train"] = full.select(train_rows[: cfg.max_train_samples] if cfg.max_train_samples else train_rows)
        data.splits["validation"] = full.select(val_rows[: cfg.max_eval_samples] if cfg.max_eval_samples else val_rows)
        data.splits = {k: data.splits[k] for k in ("train", "validation", "test") if k in data.splits}
    if classification:
        data.labels = label_set
        classes = {label: i for i, label in enumerate(label_set)}
        for records in data.splits.values():
            records.classes = classes
        if cfg.label_words is not None:
            missing = [label for label in data.labels if label not in cfg.label_words]
            if missing:
                raise DataError(f"task {cfg.name!r}: label_words has no word for labels {missing}")
    return data


def load_tasks(cfgs: list[TaskConfig]) -> list[TaskData]:
    return [load_task(c) for c in cfgs]
