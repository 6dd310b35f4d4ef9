"""One run per output directory: an exclusive ``filelock`` on ``OUTPUT_DIR/.lock``, taken by rank 0.

The lock is an OS file lock (flock), so a crashed or SIGKILLed holder releases it at once. Who holds
it (pid, host, start time) is written to ``.lock.json`` for the refusal message of a second run.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path

from filelock import FileLock, Timeout


class RunLocked(RuntimeError):
    """Another process is training into the same output directory."""


class RunLock:
    def __init__(self, output_dir: str | Path) -> None:
        self.dir = Path(output_dir)
        self.lock = FileLock(str(self.dir / ".lock"))
        self.owner = self.dir / ".lock.json"

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
        self.owner.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}))

    def release(self) -> None:
        """Release; a directory left holding nothing but the lock file is removed (nothing half-written)."""
        if self.lock.is_locked:
            self.owner.unlink(missing_ok=True)
            self.lock.release()
            try:
                if [p.name for p in self.dir.iterdir()] == [".lock"]:
                    (self.dir / ".lock").unlink()
                    self.dir.rmdir()
            except OSError:
                pass
