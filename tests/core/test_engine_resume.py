"""Checkpoint -> resume under FSDP2 and DeepSpeed ZeRO-2 (2 ranks): bitwise equal to the uninterrupted run.

The run checkpoints at steps 10 and 20; a copy of its output without step-20 and without the final
adapter resumes from step 10 (DeepSpeed restores its own partitioned optimizer state) and must end with
exactly the same adapter.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.app.test_app import make_config
from tests.core.test_distributed import free_port
from tests.models import without_dropout

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def torchrun(args: list[str], log: Path, ranks: int = 2) -> None:
    cmd = [
        str(Path(sys.executable).parent / "torchrun"),
        "--nproc_per_node",
        str(ranks),
        "--master_port",
        str(free_port()),
        "-m",
        "ortho_lora_dist.cli",
        *args,
    ]
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=400)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung: {' '.join(cmd)}")
    log.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
def test_resume_is_bitwise(engine, env, tmp_path):  # noqa: F811
    path = make_config(env, tmp_path / "full", steps=20, checkpoint_every=10, plots=False)
    cfg = yaml.safe_load(path.read_text())
    cfg["distributed"] = {"engine": engine}
    path.write_text(yaml.safe_dump(cfg))
    torchrun(["train", str(path)], tmp_path / "full.log")
    full = tmp_path / "full"
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["step-10", "step-20"]
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step-20")
    shutil.rmtree(cut / "adapter")
    (cut / "finished.json").unlink()
    torchrun(["train", str(path), f"output_dir={cut}", "--resume"], tmp_path / "cut.log")
    assert "resumed from" in (tmp_path / "cut.log").read_text()
    for f in ("adapter_model.safetensors", "heads.safetensors"):
        a, b = load_file(str(full / "adapter" / f)), load_file(str(cut / "adapter" / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


def test_resume_on_a_different_number_of_ranks(env, tmp_path):  # noqa: F811
    """2 ranks x batch 2 for 3 steps, then 1 process x batch 4 to step 6 == 1 process x batch 4 throughout (1e-5)."""

    from ortho_lora_dist.cli import main as cli

    common = dict(plots=False, schedule="constant")
    full = make_config(env, tmp_path / "full", steps=6, **common)
    cfg = yaml.safe_load(full.read_text())
    without_dropout(cfg, tmp_path / "bert-no-dropout")
    full.write_text(yaml.safe_dump(cfg))
    assert cli(["train", str(full)]) == 0
    cut_cfg = {
        **cfg,
        "output_dir": str(tmp_path / "cut"),
        "train": {**cfg["train"], "steps": 3, "per_task_batch_size": 2},
    }
    cut = tmp_path / "cut.yaml"
    cut.write_text(yaml.safe_dump(cut_cfg))
    torchrun(["train", str(cut)], tmp_path / "cut.log")
    assert (
        cli(["train", str(cut), "--resume", "train.steps=6", "train.per_task_batch_size=2"]) == 2
    )  # global batch 4 -> 2
    assert cli(["train", str(cut), "--resume", "train.steps=6", "train.per_task_batch_size=4"]) == 0
    for f in ("adapter_model.safetensors", "heads.safetensors"):
        a, b = load_file(str(tmp_path / "full" / "adapter" / f)), load_file(str(tmp_path / "cut" / "adapter" / f))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_causal_lm_under_fsdp_equals_ddp(env, tmp_path):  # noqa: F811
    """The causal-LM path (lm_head on the labelled positions through a forward pre-hook, mixed-task evaluation
    batches, generation with synced ranks) under FSDP2 == under DDP, 2 ranks each: the same adapter (1e-5) and
    the same final metrics."""
    import json

    adapters, evals = {}, {}
    for engine in ("ddp", "fsdp"):
        path = make_config(env, tmp_path / engine, kind="causal-lm", steps=3, plots=False, eval_batch_size=3)
        cfg = yaml.safe_load(path.read_text())
        cfg["distributed"] = {"engine": engine}
        cfg["lora"]["dropout"] = 0.0
        cfg["tasks"][0]["max_eval_samples"] = cfg["tasks"][1]["max_eval_samples"] = 5  # 5 records on 2 ranks: a pad
        path.write_text(yaml.safe_dump(cfg))
        torchrun(["train", str(path)], tmp_path / f"{engine}.log")
        adapters[engine] = load_file(str(tmp_path / engine / "adapter" / "adapter_model.safetensors"))
        evals[engine] = json.loads((tmp_path / engine / "eval.json").read_text())
    a, b = adapters["ddp"], adapters["fsdp"]
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    assert evals["ddp"]["validation"] == evals["fsdp"]["validation"] and evals["ddp"]["test"] == evals["fsdp"]["test"]
    assert evals["fsdp"]["loss"]["validation"] == pytest.approx(evals["ddp"]["loss"]["validation"], rel=1e-5)
