"""bench/gpu_check.py through scripts/gpu_check.sh: the --tiny path end to end, and on CUDA the NF4 kernels.

The full 7B check (`bash scripts/gpu_check.sh`) is too long for a test; --tiny runs the same code (exactness
checks, model build, benchmark loop, JSON summary) on tiny shapes, so the GPU script cannot rot unnoticed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
METHODS = ["peft_joint", "joint", "ortho", "upgrad_global", "ortho_reference"]


def run_check(tmp_path, *args, timeout=170):
    out = tmp_path / "check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if not (ROOT / ".venv/bin/python").exists():  # the script falls back to python3: make it this interpreter
        env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts/gpu_check.sh"), str(out), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summary = json.loads(proc.stdout)  # stdout is exactly one JSON document
    assert json.loads(out.read_text()) == summary
    return summary


def check_summary(s, seqs, tasks, gpu):
    assert s["complete"] and s["ok"], s.get("error")
    assert {"setup", "exactness", "benchmark", "elapsed_s"} <= s.keys()
    checks = s["exactness"]["checks"]
    assert s["exactness"]["passed"] and len(checks) == 10
    for c in checks:
        assert {"name", "max_rel_err", "tol", "passed", "per_task_rel_err", "autocast", "checkpointing"} <= c.keys()
        assert c["passed"] and c["max_rel_err"] <= c["tol"] and c["min_ref_norm"] > 0, c
    assert sum(c["checkpointing"] == "reentrant" for c in checks) >= 6
    assert sum(c["autocast"] == "bf16" for c in checks) >= 5
    assert sum("packed" in c["name"] for c in checks) == 2
    model = s["benchmark"]["model"]
    assert model["init_s"] >= 0 and model["lora_params"] > 0
    rows = s["benchmark"]["results"]
    assert sorted((r["seq"], r["tasks"]) for r in rows) == sorted((q, t) for q in seqs for t in tasks)
    for r in rows:
        assert r["status"] == "ok", r
        assert list(r["methods"]) == METHODS and list(r["vs_peft_joint"]) == METHODS
        for m in METHODS:
            res = r["methods"][m]
            assert res["tokens_per_s"] > 0 and res["step_s"] > 0 and res["timed_steps"] >= 1, (m, res)
            assert res["nonfinite_skipped_steps"] == 0
            assert r["vs_peft_joint"][m]["tokens_per_s"] > 0
            assert (res["peak_GiB"] is not None) == gpu
        assert r["vs_peft_joint"]["peft_joint"]["time"] == 1.0
    pk = s["benchmark"]["packing"]
    assert pk["status"] == "ok" and pk["packed/padded"] > 0, pk
    assert pk["efficiency"]["packed"] > pk["efficiency"]["padded"] and pk["useful_tokens"] > 0


@pytest.mark.timeout(240)
def test_tiny_cpu_end_to_end(tmp_path):
    s = run_check(tmp_path, "--tiny", "--quant", "none")
    assert s["setup"]["tiny"] and s["setup"]["quant"] == "none"
    check_summary(s, [32, 64], [3, 8], gpu=torch.cuda.is_available())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.timeout(300)
def test_tiny_cuda_nf4(tmp_path):
    """The same code on the GPU with bitsandbytes' NF4 CUDA kernels and bf16 (tiny shapes: seconds)."""
    s = run_check(tmp_path, "--tiny", "--quant", "nf4")
    assert s["setup"]["quant"] == "nf4" and s["benchmark"]["model"]["quantized_linears"] > 0
    assert all(c["base"].startswith("nf4") for c in s["exactness"]["checks"])
    check_summary(s, [32, 64], [3, 8], gpu=True)
