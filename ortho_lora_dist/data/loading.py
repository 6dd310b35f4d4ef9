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
import logging
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ortho_lora_dist.config import TaskConfig
from ortho_lora_dist.data.errors import DataError
from ortho_lora_dist.data.fields import _needed, _normalise
from ortho_lora_dist.data.formats import get_format
from ortho_lora_dist.data.sources import CHUNK, _hub_dataset, _iter_table, _rows_of_file

log = logging.getLogger("ortho_lora_dist")


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


def _schema(cfg: TaskConfig):
    return get_format(cfg.format).schema(cfg)


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
    skipped: list[str] = []
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, schema) as w:
        for where, row in rows:
            if limit is not None and n >= limit:
                break
            try:
                rec = _normalise(row, where, cfg)
                if check is not None:
                    check(rec, where)
            except DataError as e:
                if cfg.on_bad_record != "skip":
                    raise
                skipped.append(str(e))
                continue
            if seen is not None:
                seen.add(rec["label"])
            chunk.append(rec)
            n += 1
            if len(chunk) == CHUNK:
                w.write_table(pa.Table.from_pylist(chunk, schema=schema))
                chunk = []
        w.write_table(pa.Table.from_pylist(chunk, schema=schema))
    if skipped:
        log.warning(
            "task %r: skipped %d bad record%s (on_bad_record: skip); the first: %s",
            cfg.name,
            len(skipped),
            "" if len(skipped) == 1 else "s",
            skipped[0],
        )
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
