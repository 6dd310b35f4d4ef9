"""The stop signals (SLURM preemption: SIGUSR1 warning, SIGTERM) and the exception they raise while a run loads.

Light on purpose (no torch import): the CLI installs the loading-time handler before anything heavy loads.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Interrupted(BaseException):
    """A stop signal while the run was loading: nothing was written. (BaseException: no library swallows it.)"""


def raise_on_stop() -> None:
    """Until a trainer takes the signals over: a stop signal raises Interrupted."""

    def handler(signum, _frame):
        raise Interrupted(signal.Signals(signum).name)

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)


class StopSignals:
    """The stop signals for the length of a run: while ``loading``, a signal raises Interrupted at once (nothing is
    written yet and SLURM's grace period is short); afterwards it is only recorded in ``received``, and the loop
    agrees on it with the other ranks at the next step boundary."""

    def __init__(self) -> None:
        self.received: str | None = None
        self.loading = True
        self._previous: dict = {}

    def install(self) -> None:
        def handler(signum, _frame):
            self.received = signal.Signals(signum).name
            if self.loading:
                raise Interrupted(self.received)

        self._previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}

    def restore(self) -> None:
        """The handlers from before ``install`` (idempotent)."""
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        self._previous = {}
