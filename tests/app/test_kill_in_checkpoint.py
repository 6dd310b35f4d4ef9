"""A kill inside a checkpoint write: rank 1 of a 2-rank run gets SIGKILL the moment checkpoint step N's staging folder
appears (rank 0 has made it; the ranks are writing their files). The job dies, checkpoint N is never published, and
``--resume`` on 2 ranks continues from the last complete checkpoint and ends bitwise equal to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.app.test_full_disk import _adapter, _config
from tests.core.test_distributed import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
KILL_AT = 3  # the checkpoint whose write is killed; 1 and 2 are complete by then


def _two_ranks(config: Path, *extra: str) -> list[str]:
    torchrun = Path(sys.executable).parent / "torchrun"
    return [str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "ortho_lora_dist.cli",
            "train", str(config), *extra]  # fmt: skip


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "ORTHO_LORA_TIMEOUT_S": "120"}


def _rank_pid(parent: int, rank: str, deadline: float) -> int:
    """The pid of the child of ``parent`` (torchrun) whose environment says RANK=rank."""
    while time.monotonic() < deadline:
        for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
            try:
                env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(child)
        time.sleep(0.05)
    raise AssertionError(f"rank {rank} of torchrun {parent} never started")


def _config_for(env, run: Path, tmp: Path, name: str) -> Path:
    cfg = yaml.safe_load(_config(env, run).read_text())
    cfg["train"]["per_task_batch_size"] = 2  # 2 ranks x 2 = the global batch of the uninterrupted run
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_sigkill_inside_a_two_rank_checkpoint_write_resumes_bitwise(env, tmp_path):  # noqa: F811
    full = tmp_path / "full"
    done = subprocess.run(_two_ranks(_config_for(env, full, tmp_path, "full")), env=_env(), capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]

    run = tmp_path / "killed"
    config = _config_for(env, run, tmp_path, "killed")
    staging = run / "checkpoints" / f".step-{KILL_AT}.tmp"
    job = subprocess.Popen(_two_ranks(config), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        victim = _rank_pid(job.pid, "1", time.monotonic() + 120)
        deadline = time.monotonic() + 300
        while not staging.exists():  # a tight poll: the write of a tiny model's checkpoint takes milliseconds
            assert job.poll() is None and time.monotonic() < deadline, "the run ended before checkpoint 3"
        os.kill(victim, signal.SIGKILL)
        out, _ = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0, out[-3000:]
    assert not (run / "checkpoints" / f"step-{KILL_AT}").exists(), "the kill came after the publish: not inside"
    assert (run / "checkpoints" / f"step-{KILL_AT - 1}" / "trainer_state.json").is_file()

    resumed = subprocess.run(_two_ranks(config, "--resume"), env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not staging.exists()  # the leftover staging folder was replaced by the step's real checkpoint
    a, b = _adapter(full), _adapter(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
