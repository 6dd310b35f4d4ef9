"""The run folder (OUTPUT_DIR) as one object: its lock, the claim of a new run, and the finished marker.

One run per output directory: an exclusive ``filelock`` on ``OUTPUT_DIR/.lock``, taken by rank 0. The lock is an
OS file lock (flock), so a crashed or SIGKILLed holder releases it at once. Who holds it (pid, host, start time) is
written to ``.lock.json`` for the refusal message of a second run. File names: runtime/run_files.py.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path

from filelock import FileLock, Timeout

from ortho_lora_dist.runtime import jsonio
from ortho_lora_dist.runtime import run_files as rf
from ortho_lora_dist.runtime.distributed import DistInfo, all_ok
from ortho_lora_dist.runtime.fsutil import atomic_write_text
from ortho_lora_dist.training.checkpoint import checkpoint_dirs


class RunLocked(RuntimeError):
    """Another process is training into the same output directory."""


class RunExists(RuntimeError):
    """output_dir already holds a run and --resume was not given."""


class RunLock:
    def __init__(self, output_dir: str | Path) -> None:
        self.dir = Path(output_dir)
        self.lock = FileLock(str(self.dir / rf.LOCK))
        self.owner = self.dir / rf.LOCK_OWNER

    def acquire(self) -> None:
        """Take the lock or raise RunLocked naming the holder."""
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            try:
                who = json.loads(self.owner.read_text())
                holder = f"pid {who.get('pid')} on host {who.get('host')} (since {who.get('since')})"
            except (OSError, ValueError):
                holder = "another process"
            raise RunLocked(
                f"output_dir {self.dir} is in use by {holder}: one run per output_dir; wait for it, stop it, "
                "or choose another output_dir"
            ) from None
        since = datetime.datetime.now().isoformat(timespec="seconds")
        self.owner.write_text(jsonio.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}))

    def release(self) -> None:
        """Release; a directory left holding nothing but the lock file is removed (nothing half-written)."""
        if self.lock.is_locked:
            self.owner.unlink(missing_ok=True)
            self.lock.release()
            try:
                if [p.name for p in self.dir.iterdir()] == [rf.LOCK]:
                    (self.dir / rf.LOCK).unlink()
                    self.dir.rmdir()
            except OSError:
                pass


class RunDir:
    """OUTPUT_DIR of one training run. ``claim`` and ``release`` are rank 0's; the paths are everyone's."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.lock: RunLock | None = None

    @property
    def adapter(self) -> Path:
        return self.path / rf.ADAPTER

    def check_path(self) -> None:
        """output_dir must be a folder or creatable as one: FileExistsError naming it (exit 2) otherwise."""
        if self.path.exists() and not self.path.is_dir():
            raise FileExistsError(f"output_dir {self.path} is a file, not a folder: choose another output_dir")
        for parent in self.path.parents:
            if parent.exists() and not parent.is_dir():
                raise FileExistsError(
                    f"output_dir {self.path}: {parent} is a file, so no folder can be made below "
                    "it; choose another output_dir"
                )

    def previous_run(self) -> str | None:
        """What in the folder shows a previous run (None if nothing)."""
        for name in (rf.FINISHED, rf.ADAPTER, rf.METRICS):
            if (self.path / name).exists():
                return name
        return f"{rf.CHECKPOINTS}/" if checkpoint_dirs(self.path) else None

    def claim(self, resume: bool) -> None:
        """Lock the folder (one run per folder); refuse to train over a previous run without --resume."""
        found = self.previous_run()
        if found and not resume:
            raise RunExists(
                f"output_dir {self.path} already holds a run ({found}): pass --resume to continue it, "
                "or choose another output_dir (nothing was changed)"
            )
        self.lock = RunLock(self.path)
        self.lock.acquire()

    def claim_everywhere(self, info: DistInfo, resume: bool) -> None:
        """``claim`` on rank 0; every rank learns the outcome (one vote) and raises together."""
        error: Exception | None = None
        if info.main:
            try:
                self.claim(resume)
            except (RunExists, RunLocked) as e:
                error = e
        if not all_ok(info, error is None):
            raise error or RunLocked(f"output_dir {self.path} cannot be used (see rank 0's error)")

    def begin(self, config_yaml: str, layout, names: list[str]) -> None:
        """A (re)started run: config.yaml, blocks.json, and no finished.json until this run writes its own."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_text(rf.CONFIG, config_yaml)
        self.mark_unfinished()
        self.write_blocks(layout, names)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def finished_at(self) -> int | None:
        """The step finished.json records, when the adapter and eval.json it promises are there too."""
        try:
            step = json.loads((self.path / rf.FINISHED).read_text()).get("step")
        except (OSError, ValueError):
            return None
        complete = (self.adapter / rf.ADAPTER_WEIGHTS).is_file() and (self.path / rf.EVAL).is_file()
        return step if complete else None

    def mark_finished(self, step: int, total_steps: int) -> None:
        atomic_write_text(self.path / rf.FINISHED, jsonio.dumps({"step": step, "total_steps": total_steps}))

    def mark_unfinished(self) -> None:
        """A resumed run with more steps is not finished (until its own finished.json)."""
        (self.path / rf.FINISHED).unlink(missing_ok=True)

    def write_blocks(self, layout, names: list[str]) -> None:
        """blocks.json: what the conflict map's rows (LoRA blocks) and columns (task pairs) are."""
        pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
        self.write_json(
            rf.BLOCKS,
            {
                "granularity": layout.granularity,
                "names": list(layout.block_names),
                "kinds": layout.block_factor_kind(),
                "tasks": names,
                "pairs": pairs,
            },
        )

    def write_json(self, name: str, obj, indent: int | None = None) -> None:
        atomic_write_text(self.path / name, jsonio.dumps(obj, indent=indent))

    def write_text(self, name: str, text: str) -> None:
        atomic_write_text(self.path / name, text)
