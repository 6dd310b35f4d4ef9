"""bench/comm_memory.py --measure on 2 gloo ranks: the measured traffic rows of docs/results.md come from it.
Per-task rules send (T + 1)/2 x joint's bytes, a loss-only rule exactly joint's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.core.test_distributed import TIMEOUT, free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_measured_traffic_rows():
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()), "bench/comm_memory.py"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [*cmd, "--measure", "--tasks", "3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {(r["strategy"], r["reduce"]): r for r in map(json.loads, proc.stdout.splitlines()) if r.get("measured")}
    assert set(rows) == {("ortho", "step"), ("ortho", "eager"), ("famo", "step"), ("famo", "eager")}
    for (strategy, policy), r in rows.items():
        assert r["T"] == 3 and r["N"] == 2
        assert r["sent_ratio"] == (1.0 if strategy == "famo" else 2.0), r  # (T + 1) / 2 = 2 for a per-task rule
        if policy == "eager":
            assert r["collectives_per_micro_batch"] > 0 and r["extra_floats_over_P"] <= r["goal_floats_over_P"], r
    assert rows["famo", "eager"]["extra_floats_over_P"] < rows["ortho", "eager"]["extra_floats_over_P"]
