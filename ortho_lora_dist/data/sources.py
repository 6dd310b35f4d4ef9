"""Reading a split's raw rows: strict JSONL (line by line, UTF-8 checked), JSON arrays, CSV / TSV, Parquet,
``save_to_disk`` folders and Hub datasets, each row with the place it came from (file and line, or row)."""

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from ortho_lora_dist.config import TaskConfig
from ortho_lora_dist.data.errors import DataError
from ortho_lora_dist.runtime.hub import hub_hint, is_unreachable

TABLE_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".json": "json"}
CHUNK = 4096  # records per Arrow batch written / read while checking


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
def quiet_datasets():
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
        with quiet_datasets():
            return datasets.load_dataset(kind, data_files=str(path), split="train", **kw)
    except Exception as e:  # a malformed file: say which, with the reader's own words
        raise DataError(
            f"task {task!r}: {path} could not be read as {path.suffix[1:].upper()} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def _from_disk(path: Path, split_name: str, task: str):
    import datasets

    try:
        with quiet_datasets():
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
        with quiet_datasets():
            return datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=split)
    except ValueError as e:
        if "Unknown split" not in str(e) and "split" not in str(e).lower():
            raise
        raise DataError(
            f"task {cfg.name!r}: dataset {cfg.dataset} has no split {split!r} ({e}); name one of its splits "
            "(train_split / eval_split / test_split), set eval_split: null for no evaluation, or hold out "
            "validation_fraction of train"
        ) from None
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
