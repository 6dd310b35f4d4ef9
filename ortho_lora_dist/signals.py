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
