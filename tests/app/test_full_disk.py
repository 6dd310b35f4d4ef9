"""A REAL full disk (a small tmpfs as the output folder, not an injected OSError): safetensors raises SafetensorError,
torch.save a RuntimeError from its zip writer, Python's files OSError. Every rank stops within seconds with one line
and exit 1, the previous checkpoint stays the newest valid one, and a resume ends bitwise equal to an uninterrupted
run. Needs root to mount a tmpfs (CI runs as root); skipped with the reason otherwise."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ortho_lora_dist.cli import main as cli
from tests.app.test_app import make_config
from tests.core.test_distributed import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk():
    """A mount factory: a tmpfs of the given size (KiB), unmounted afterwards."""
    mounted: list[Path] = []

    def mount(kib: int) -> Path:
        where = Path("/tmp") / f"ortho-full-disk-{uuid.uuid4().hex[:8]}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(where)], capture_output=True)
        if proc.returncode != 0:
            where.rmdir()
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip() or 'not root'})")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], capture_output=True)
        shutil.rmtree(where, ignore_errors=True)


def _config(env, out: Path, steps: int = 6):
    path = make_config(env, out, steps=steps, checkpoint_every=1, keep_checkpoints=2, plots=False, report_to=[])
    cfg = yaml.safe_load(path.read_text())
    cfg["output_dir"] = str(out)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _adapter(run: Path) -> dict:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_full_disk_one_line_previous_checkpoint_intact_resume_exact(env, tmp_path, small_disk, capsys):  # noqa: F811
    full = tmp_path / "full"
    assert cli(["train", str(_config(env, full))]) == 0
    disk = small_disk(150)  # room for the data of one checkpoint and the logs, not for two checkpoints
    run = disk / "run"
    path = _config(env, run)
    capsys.readouterr()
    assert cli(["train", str(path)]) == 1
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert "No space left on device" in lines[0] and "--resume" in lines[0]
    moved = tmp_path / "moved"  # the user frees space: here, the run moves to a disk with room
    shutil.copytree(run, moved)
    assert any((moved / "checkpoints").glob("step-*/trainer_state.json")), "a complete checkpoint survived"
    assert cli(["train", str(path), f"output_dir={moved}", "--resume"]) == 0
    a, b = _adapter(full), _adapter(moved)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_disk_on_two_ranks_stops_every_rank_within_seconds(env, tmp_path, small_disk):  # noqa: F811
    disk = small_disk(150)
    path = _config(env, disk / "run")
    cfg = yaml.safe_load(path.read_text())
    cfg["train"]["per_task_batch_size"] = 2
    config = tmp_path / "run.yaml"  # the config itself on a disk with room
    config.write_text(yaml.safe_dump(cfg))
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "ortho_lora_dist.cli"]
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "ORTHO_LORA_TIMEOUT_S": "600"}
    start = time.monotonic()
    proc = subprocess.run([*cmd, "train", str(config)], env=run_env, capture_output=True, text=True, timeout=300)
    took = time.monotonic() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and took < 120, f"{took:.0f} s: a rank waited for the collective timeout\n{out[-3000:]}"
    # every rank that had a write left stops with one line (where the disk fills after the last collective, only
    # rank 0, which writes the results, has anything left to fail)
    errors = [x for x in out.splitlines() if "error:" in x]
    assert 1 <= len(errors) <= 2 and all("failed" in x and "--resume" in x for x in errors), out[-3000:]
    # torchrun itself reports the failed children with a traceback of its own; no frame of ours is in the output
    assert "ortho_lora_dist/" not in "".join(x for x in out.splitlines() if x.strip().startswith("File ")), out[-3000:]
