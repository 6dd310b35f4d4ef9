"""Run the launcher command, forwarding SIGUSR1 / SIGTERM to the training processes.

The launcher process (torchrun, deepspeed) is started with SIGUSR1 ignored, so it survives the
preemption warning; on SIGUSR1 or SIGTERM this wrapper sends SIGUSR1 to every process below it,
each training rank finishes its step, the ranks agree at the step boundary, write one checkpoint
and exit 0, and the exit status of the launcher becomes ours.
"""

from __future__ import annotations

import os
import signal
import subprocess


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def run(cmd: list[str], env: dict | None = None) -> int:
    def ignore_usr1() -> None:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    proc = subprocess.Popen(cmd, env=env, preexec_fn=ignore_usr1)

    def forward(signum, _frame) -> None:
        for pid in _descendants(proc.pid):
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
