"""`ortho-lora launch`: the exact commands, and the wrong combinations refused before anything starts."""

from __future__ import annotations

import pytest
import yaml

from ortho_lora_dist.cli import main as cli
from tests.app.test_app import make_config


def cfg_with(env, tmp_path, engine):  # noqa: F811
    path = make_config(env, tmp_path / f"run-{engine}")
    c = yaml.safe_load(path.read_text())
    c["distributed"] = {"engine": engine}
    path.write_text(yaml.safe_dump(c))
    return path


def test_dry_run_torchrun(env, tmp_path, capsys, monkeypatch):  # noqa: F811
    for var in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    path = cfg_with(env, tmp_path, "ddp")
    assert cli(["launch", str(path), "train.lr=1e-3", "--nproc-per-node", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out.strip()
    assert "torchrun --nnodes=1 --nproc-per-node=2 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:29500" in out
    assert out.endswith(f"-m ortho_lora_dist.cli train {path} train.lr=1e-3")
    assert not (tmp_path / "run-ddp").exists(), "a dry run writes nothing"


def test_dry_run_deepspeed_multinode_flags(env, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    path = cfg_with(env, tmp_path, "deepspeed")
    args = [
        "launch",
        str(path),
        "--launcher",
        "deepspeed",
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--master-addr",
        "10.0.0.1",
        "--dry-run",
    ]
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert (
        "--master_addr=10.0.0.1" in out
        and "--no_ssh --node_rank=1" in out
        and "--module ortho_lora_dist.cli train" in out
    )


def test_wrong_combinations_are_refused(env, tmp_path, capsys):  # noqa: F811
    ddp = cfg_with(env, tmp_path, "ddp")
    assert cli(["launch", str(ddp), "--launcher", "deepspeed", "--dry-run"]) == 2
    assert "the deepspeed launcher needs distributed.engine: deepspeed" in capsys.readouterr().err
    acc = tmp_path / "fsdp_accelerate.yaml"
    acc.write_text("distributed_type: FSDP\nnum_processes: 2\n")
    ds = cfg_with(env, tmp_path, "deepspeed")
    assert cli(["launch", str(ds), "--launcher", "accelerate", "--accelerate-config", str(acc), "--dry-run"]) == 2
    assert "distributed_type FSDP would wrap the model in accelerate's own fsdp engine" in capsys.readouterr().err
    assert cli(["launch", str(ddp), "--nnodes", "2", "--node-rank", "2", "--dry-run"]) == 2
    assert "node rank 2 is outside [0, 1]" in capsys.readouterr().err
    assert cli(["launch", str(ddp), "train.lrr=1", "--dry-run"]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err


def test_accelerate_command(env, tmp_path, capsys):  # noqa: F811
    path = cfg_with(env, tmp_path, "ddp")
    assert cli(["launch", str(path), "--launcher", "accelerate", "--nproc-per-node", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "accelerate launch --num_machines=1 --num_processes=2 --machine_rank=0" in out and "--multi_gpu" in out


@pytest.mark.slow
def test_accelerate_launch_end_to_end(env, tmp_path):  # noqa: F811
    """`ortho-lora launch --launcher accelerate`: 2 CPU processes (gloo) train, checkpoint and evaluate."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.core.test_distributed import free_port

    if not (Path(sys.executable).parent / "accelerate").exists():
        pytest.skip("accelerate's launcher is not installed")
    root = Path(__file__).resolve().parents[2]
    path = make_config(env, tmp_path / "run", steps=2, plots=False)
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}
    cmd = [
        sys.executable,
        "-m",
        "ortho_lora_dist.cli",
        "launch",
        str(path),
        "--launcher",
        "accelerate",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
    ]
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung: {' '.join(cmd)}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "accelerate launch --num_machines=1 --num_processes=2" in proc.stdout
    assert "were not passed to `accelerate launch`" not in out
    run = tmp_path / "run"
    assert (run / "finished.json").is_file() and (run / "adapter" / "adapter_model.safetensors").is_file()
    state = json.loads((run / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    assert sorted(p.name for p in (run / "checkpoints" / "step-2").glob("rng*.safetensors")) == [
        "rng0.safetensors",
        "rng1.safetensors",
    ]
