"""Every model family under FSDP2 at 2 gloo ranks == one process, full precision and over an NF4 base.

tests/family_worker.py trains each family (tiny random config of its real architecture, LoRA on attention + MLP +
lm_head; MoE: attention + lm_head) 2 AdamW steps of strategy ortho on samples with answers of 1-6 tokens, in one
process and with the base sharded by ``fully_shard`` (core/engines/fsdp.py) at 2 ranks, each rank half the samples.
Checks: the two ranks hold bitwise equal LoRA weights, training moved them, and they equal one process's to 1e-5
(fp32) / 1e-4 (NF4: bf16 storage, the tolerance of tests/core/test_distributed.py's NF4 check); the sharded model's
forward before training equals the unsharded one's exactly. Which cells these are: tests/family_support.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.core.test_distributed import free_port, rel
from tests.family_support import cell
from tests.models import FAMILIES, save_family

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "family_worker.py"
TIMEOUT = 600
pytestmark = pytest.mark.slow


def _run(out: Path, models: Path, ranks: int, *extra: str) -> None:
    bindir = Path(sys.executable).parent
    args = [str(WORKER), "--models", str(models), "--out", str(out), *extra]
    if ranks > 1:
        cmd = [str(bindir / "torchrun"), "--nproc_per_node", str(ranks), "--master_port", str(free_port()), *args]
    else:
        cmd = [sys.executable, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("families")
    for family in FAMILIES:
        save_family(family, root / family)
    return root


def _check(single: Path, sharded: Path, family: str, tol: float) -> None:
    r0, r1 = load_file(sharded / family / "rank0.safetensors"), load_file(sharded / family / "rank1.safetensors")
    assert all(torch.equal(r0[k], r1[k]) for k in r0), f"{family}: the ranks' LoRA weights differ"
    ref, init = load_file(single / family / "rank0.safetensors"), load_file(single / family / "init0.safetensors")
    assert r0.keys() == ref.keys()
    assert rel(ref, init) > 1e-3, f"{family}: training did not move the weights"
    a = load_file(single / family / "forward0.safetensors")["logits"]
    b = load_file(sharded / family / "forward0.safetensors")["logits"]
    torch.testing.assert_close(b, a, rtol=0, atol=0, msg=f"{family}: the sharded forward differs")
    assert rel(r0, ref) < tol, f"{family}: FSDP2 2 ranks vs 1 process {rel(r0, ref):.2e}"


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_fsdp2_two_ranks(models, tmp_path, quant):
    feature = "FSDP2, 2 ranks == 1 process" if quant == "none" else "NF4 base, FSDP2 2 ranks"
    families = [f for f in FAMILIES if cell(f, feature) == "yes"]
    _run(tmp_path / "single", models, 1, "--quant", quant, "--families", ",".join(families))
    _run(tmp_path / "fsdp", models, 2, "--quant", quant, "--families", ",".join(families))
    for family in families:
        _check(tmp_path / "single", tmp_path / "fsdp", family, 1e-5 if quant == "none" else 1e-4)
