"""Progress of long loops: a tqdm bar on a terminal, periodic plain lines in a log file (SLURM .out)."""

from __future__ import annotations

import sys
import time


class _Lines:
    """tqdm's update / set_postfix / close, printed as one line every ``every_s`` seconds (and at the end)."""

    def __init__(self, total: int, initial: int, desc: str, every_s: float) -> None:
        self.total, self.n, self.desc, self.every_s = total, initial, desc, every_s
        self.postfix: dict = {}
        self.t0 = self.last = time.monotonic()
        self.start = initial

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.monotonic()
        if now - self.last >= self.every_s or self.n >= self.total:
            self.last = now
            rate = (self.n - self.start) / max(now - self.t0, 1e-9)
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            extra = " ".join(f"{k}={v}" for k, v in self.postfix.items())
            print(
                f"{self.desc}: {self.n}/{self.total} ({rate:.2f}/s, eta {eta:.0f}s) {extra}".rstrip(),
                file=sys.stderr,
                flush=True,
            )

    def set_postfix(self, values: dict) -> None:
        self.postfix = dict(values)

    def close(self) -> None:
        pass


class _Off:
    def update(self, k: int = 1) -> None:
        pass

    def set_postfix(self, values: dict) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int, initial: int = 0, enabled: bool = True, desc: str = "", every_s: float = 30.0):
    """A progress reporter: tqdm when stderr is a terminal, else a plain line every ``every_s`` seconds."""
    if not enabled:
        return _Off()
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
    return _Lines(total, initial, desc, every_s)
