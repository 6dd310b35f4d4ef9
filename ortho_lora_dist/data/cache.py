"""Task data prepared once per job: the first rank reads, checks and fits every split, the others read the result.

``distributed.data_cache`` holds one folder per fingerprint, a SHA-256 of everything the prepared data depends on
(the tasks' configs, each source file's path, size and modification time, and the caller's ``extra``: tokenizer,
max_length, truncation policy), so a requeue, a resume or a second run on the same data reuses it and any change
prepares anew. A folder is written under a temporary name and renamed when complete (with ``manifest.json`` listing
every file and its size, written last); a folder whose manifest is missing or does not match its files is moved
aside and prepared again. The preparer holds a file lock (two jobs on the same data prepare it once); the other ranks
of the job wait for the folder to appear, then memory-map it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ortho_lora_dist.config import TaskConfig
from ortho_lora_dist.data.loading import Records, TaskData
from ortho_lora_dist.data.sources import quiet_datasets
from ortho_lora_dist.runtime import jsonio
from ortho_lora_dist.runtime.fsutil import atomic_write_text

log = logging.getLogger("ortho_lora_dist")

LAYOUT = 1  # the cache folder's layout; a change makes older folders unused
MANIFEST = "manifest.json"
WAIT_LOG_SECONDS = 60.0


def default_root() -> Path:
    """$ORTHO_LORA_DATA_CACHE, else $HF_HOME/ortho_lora_dist/data (where a cluster's users already point HF's caches
    at a shared filesystem)."""
    if os.environ.get("ORTHO_LORA_DATA_CACHE"):
        return Path(os.environ["ORTHO_LORA_DATA_CACHE"]).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "ortho_lora_dist" / "data"


def cache_root(setting: str | None) -> Path | None:
    """The folder of distributed.data_cache: auto -> default_root(), null -> None (no cache), else the path."""
    if setting is None:
        return None
    return default_root() if setting == "auto" else Path(setting).expanduser()


def _source_stats(path: str) -> list:
    """[relative path, size, mtime_ns] of a source file, or of every file under a save_to_disk folder."""
    p = Path(path)
    if p.is_dir():
        return [[str(f.relative_to(p)), *_stat(f)] for f in sorted(p.rglob("*")) if f.is_file()]
    return [[p.name, *_stat(p)]] if p.exists() else [[p.name, None, None]]


def _stat(p: Path) -> list:
    s = p.stat()
    return [s.st_size, s.st_mtime_ns]


def fingerprint(tasks: list[TaskConfig], extra: dict[str, Any]) -> str:
    """SHA-256 (hex, 24 chars) of the tasks' configs, their local sources' sizes and times, and ``extra``."""
    from ortho_lora_dist import __version__

    parts: dict[str, Any] = {"layout": LAYOUT, "version": __version__, "extra": extra, "tasks": []}
    for t in tasks:
        files = {k: [str(Path(v).resolve()), _source_stats(v)] for k, v in (t.files or {}).items()}
        if t.dataset is not None and Path(t.dataset).is_dir():
            files["dataset"] = [str(Path(t.dataset).resolve()), _source_stats(t.dataset)]
        parts["tasks"].append({"config": t.model_dump(mode="json"), "files": files})
    blob = jsonio.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def _files_of(folder: Path) -> dict[str, int]:
    return {
        str(f.relative_to(folder)): f.stat().st_size
        for f in sorted(folder.rglob("*"))
        if f.is_file() and f.name != MANIFEST
    }


def _write(folder: Path, tasks: list[TaskData]) -> None:
    """Every split with save_to_disk (selections flattened), then the manifest: labels, splits, file sizes."""
    meta = []
    for i, task in enumerate(tasks):
        for split, records in task.splits.items():
            with quiet_datasets():
                records.ds.save_to_disk(str(folder / f"task{i}" / split))
        meta.append({"name": task.name, "labels": task.labels, "splits": list(task.splits)})
    atomic_write_text(folder / MANIFEST, jsonio.dumps({"tasks": meta, "files": _files_of(folder)}, indent=1))


def _read(folder: Path, cfgs: list[TaskConfig]) -> list[TaskData] | None:
    """The tasks of a complete folder (memory-mapped), or None when its manifest is missing or does not match."""
    import datasets

    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest["files"] != _files_of(folder) or [t["name"] for t in manifest["tasks"]] != [c.name for c in cfgs]:
            return None
        out = []
        for i, (meta, cfg) in enumerate(zip(manifest["tasks"], cfgs)):
            data = TaskData(cfg.name, cfg, labels=meta["labels"])
            classes = None if meta["labels"] is None or cfg.type != "classification" else meta["labels"]
            index = {label: k for k, label in enumerate(classes)} if classes is not None else None
            for split in meta["splits"]:
                data.splits[split] = Records(datasets.load_from_disk(str(folder / f"task{i}" / split)), index)
            out.append(data)
        return out
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _prepare(root: Path, key: str, cfgs: list[TaskConfig], prepare: Callable[[], list[TaskData]]) -> list[TaskData]:
    """Under the fingerprint's lock: reuse a complete folder, or prepare into a temporary one and rename it."""
    from filelock import FileLock

    folder = root / key
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{key}.lock")):
        if folder.exists():
            found = _read(folder, cfgs)
            if found is not None:
                log.info("data: prepared before, reused from %s", folder)
                return found
            aside = root / f"{key}.bad-{uuid.uuid4().hex[:8]}"
            os.replace(folder, aside)  # readers that already opened it keep their files; nobody new finds it
            log.warning("data: %s was incomplete or damaged: moved to %s, preparing again", folder, aside)
            shutil.rmtree(aside, ignore_errors=True)
        start = time.monotonic()
        tasks = prepare()
        tmp = root / f"{key}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            _write(tmp, tasks)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info(
            "data: prepared in %.1f s, kept in %s for the other ranks and later starts",
            time.monotonic() - start,
            folder,
        )
        found = _read(folder, cfgs)
        if found is None:
            raise OSError(f"data cache {folder} could not be read back after writing it")
        return found


def _wait(root: Path, key: str, cfgs: list[TaskConfig]) -> list[TaskData]:
    """A non-preparing rank: poll until the preparer's folder is complete, saying why it waits once a minute (a stop
    signal ends the wait: runtime/signals.py raises while loading)."""
    folder, start, said = root / key, time.monotonic(), 0.0
    while True:
        found = _read(folder, cfgs) if (folder / MANIFEST).is_file() else None
        if found is not None:
            return found
        waited = time.monotonic() - start
        if waited - said >= WAIT_LOG_SECONDS:
            said = waited
            log.warning(
                "data: waiting %.0f s for rank 0 to prepare %s (if the nodes do not share this folder, set "
                "distributed.data_cache to a folder they all see, or null to prepare on every rank)",
                waited,
                folder,
            )
        time.sleep(0.5)


def prepared_tasks(
    cfgs: list[TaskConfig],
    prepare: Callable[[], list[TaskData]],
    root: Path | None,
    extra: dict[str, Any],
    preparer: bool,
) -> list[TaskData]:
    """``prepare()`` once per fingerprint of (cfgs, sources, extra) under ``root``: by the ``preparer`` rank, the
    others wait and read it; ``root`` None: every rank prepares."""
    if root is None:
        return prepare()
    key = fingerprint(cfgs, extra)
    return _prepare(root, key, cfgs, prepare) if preparer else _wait(root, key, cfgs)
