"""The checks of bench/gpu_check.py (the driver), one module each; the helpers they share are in common."""

import time

T0 = time.monotonic()  # the run's clock (budget, log lines): taken as this package loads, before any module loads torch
