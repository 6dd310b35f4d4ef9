"""A real two-node SLURM cluster on this machine (Debian's slurmctld + 2 slurmd + munge) running our own
sbatch scripts as shipped: multi-node torchrun, multi-node deepspeed, and preemption -> checkpoint ->
requeue -> resume ending with the same adapter as an uninterrupted run.

Needs root (daemons, /etc/hosts) and the packages (installed with apt-get when missing): skipped
otherwise, with the reason. CI runs as root, so CI runs these. The cluster is stopped at the end of
the session even when a test fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.models import save_app_models, without_dropout, write_app_tasks

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to start slurmctld/slurmd and munged"
    have = all(shutil.which(x) for x in ("slurmctld", "slurmd", "sbatch", "munged"))
    if not have and shutil.which("apt-get") is None:
        return "SLURM is not installed and apt-get is unavailable"
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    subprocess.run(["bash", "slurm/local_cluster.sh", "install"], cwd=ROOT, check=True, timeout=600)
    state = tmp_path_factory.mktemp("slurm")
    conf = str(state / "slurm.conf")
    try:
        subprocess.run(["bash", "slurm/local_cluster.sh", "start", str(state)], cwd=ROOT, check=True, timeout=120)
        yield {**os.environ, "SLURM_CONF": conf}
    finally:
        subprocess.run(["bash", "slurm/local_cluster.sh", "stop", str(state)], cwd=ROOT, timeout=120)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm-app")
    return {"models": save_app_models(root / "models"), "data": write_app_tasks(root / "data"), "root": root}


def config(app, name: str, engine: str = "ddp", steps: int = 40) -> Path:
    d = app["data"]
    cfg = {
        "model": {"name_or_path": app["models"]["bert"], "max_length": 16},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["query", "value"]},
        "tasks": [{"name": n, "files": d[n]} for n in ("sentiment", "topic")],
        "train": {"lr": 5e-3, "steps": steps, "per_task_batch_size": 4, "log_every": 1, "plots": False, "seed": 1},
        "distributed": {"engine": engine},
        "output_dir": str(app["root"] / name),
    }
    path = app["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def sbatch(env, script: str, cfg: Path, log: Path, nproc: int = 1) -> str:
    run_env = {
        **env,
        "CONFIG": str(cfg),
        "NPROC_PER_NODE": str(nproc),
        "VENV": str(Path(os.sys.executable).parent.parent),
        "DS_ACCELERATOR": "cpu",
        "HF_HUB_OFFLINE": "1",
    }
    out = subprocess.run(
        ["sbatch", "--parsable", f"--output={log}", script],
        cwd=ROOT,
        env=run_env,
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip().split(";")[0]


def job_field(env, job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    for token in out.split():
        if token.startswith(field + "="):
            return token.split("=", 1)[1]
    return ""


def wait_done(env, job: str, log: Path, timeout: float = 300) -> str:
    """Wait for the job to end; a requeued job held by SLURM's begin-time delay is released at once."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job_field(env, job, "JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        if state == "PENDING" and job_field(env, job, "Reason") == "BeginTime":
            # not within the second of the requeue: slurmd refuses a credential issued then ("Job credential
            # revoked") and the job ends FAILED (real clusters wait SLURM's own begin-time delay instead)
            time.sleep(2)
            subprocess.run(["scontrol", "update", f"jobid={job}", "starttime=now"], env=env)
        time.sleep(0.5)
    subprocess.run(["scancel", job], env=env)
    pytest.fail(f"job {job} did not finish in {timeout}s:\n{log.read_text()[-3000:] if log.exists() else ''}")


def check_outputs(out: Path, log: Path) -> None:
    text = log.read_text()
    for f in (
        "adapter/adapter_model.safetensors",
        "adapter/heads.safetensors",
        "metrics.jsonl",
        "eval.json",
        "finished.json",
    ):
        assert (out / f).is_file(), f"{f} missing:\n{text[-3000:]}"
    assert "average" in (out / "eval.json").read_text()


def test_torchrun_two_nodes(cluster, app, tmp_path):
    cfg = config(app, "torchrun")
    log = tmp_path / "torchrun.out"
    job = sbatch(cluster, "slurm/train_torchrun.sbatch", cfg, log)
    assert wait_done(cluster, job, log) == "COMPLETED", log.read_text()[-3000:]
    check_outputs(app["root"] / "torchrun", log)
    assert log.read_text().count("--nnodes=2 --nproc-per-node=1") == 2, "one torchrun agent per node"


def test_two_nodes_two_ranks_each_equal_one_process(cluster, app, tmp_path):
    """The shipped torchrun sbatch at 2 nodes x 2 ranks (4 gloo ranks, 1 sample per task each) ends with the
    adapter and heads that one process trains on the same global batch (dropout off: its masks are per-rank
    random streams), to 1e-5."""
    cfg = yaml.safe_load(config(app, "four", steps=6).read_text())
    without_dropout(cfg, tmp_path / "bert")
    runs = {}
    for name, per_rank in (("four", 1), ("one", 4)):  # per_task_batch_size is per rank: the same global batch
        cfg["output_dir"] = str(app["root"] / name)
        cfg["train"]["per_task_batch_size"] = per_rank
        runs[name] = app["root"] / f"{name}.yaml"
        runs[name].write_text(yaml.safe_dump(cfg))
    log = tmp_path / "four.out"
    job = sbatch(cluster, "slurm/train_torchrun.sbatch", runs["four"], log, nproc=2)
    assert wait_done(cluster, job, log) == "COMPLETED", log.read_text()[-3000:]
    assert log.read_text().count("--nnodes=2 --nproc-per-node=2") == 2, "two ranks on each of the two nodes"
    one = subprocess.run(
        [os.sys.executable, "-m", "ortho_lora_dist.cli", "train", str(runs["one"])],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    for f in ("adapter/adapter_model.safetensors", "adapter/heads.safetensors"):
        a, b = load_file(str(app["root"] / "one" / f)), load_file(str(app["root"] / "four" / f))
        num = sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5
        assert a.keys() == b.keys() and num / sum(float(a[k].pow(2).sum()) for k in a) ** 0.5 < 1e-5, f


def test_deepspeed_two_nodes(cluster, app, tmp_path):
    cfg = config(app, "deepspeed", engine="deepspeed")
    log = tmp_path / "deepspeed.out"
    job = sbatch(cluster, "slurm/train_deepspeed.sbatch", cfg, log)
    assert wait_done(cluster, job, log) == "COMPLETED", log.read_text()[-3000:]
    check_outputs(app["root"] / "deepspeed", log)
    text = log.read_text()
    assert "--no_ssh --node_rank=0" in text and "--no_ssh --node_rank=1" in text


def test_preemption_checkpoints_requeues_and_resumes(cluster, app, tmp_path):
    steps = 300
    full_cfg, cut_cfg = config(app, "full", steps=steps), config(app, "cut", steps=steps)
    log_full, log_cut = tmp_path / "full.out", tmp_path / "cut.out"
    job_full = sbatch(cluster, "slurm/train_torchrun.sbatch", full_cfg, log_full)
    assert wait_done(cluster, job_full, log_full) == "COMPLETED", log_full.read_text()[-3000:]

    job = sbatch(cluster, "slurm/train_torchrun.sbatch", cut_cfg, log_cut)
    metrics = app["root"] / "cut" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.05)
    assert metrics.exists(), log_cut.read_text()[-3000:]
    subprocess.run(
        ["scancel", "--batch", "--signal=USR1", job], env=cluster, check=True
    )  # what SLURM does at --signal=B:USR1@T
    assert wait_done(cluster, job, log_cut) == "COMPLETED", log_cut.read_text()[-3000:]
    text = log_cut.read_text()
    assert "preemption warning" in text and "requeueing job" in text, text[-3000:]
    assert job_field(cluster, job, "Restarts") == "1"
    assert "resumed from" in text and "(restart 1)" in text
    first_ckpt = [line for line in text.splitlines() if "checkpoint written at step" in line]
    assert first_ckpt and int(first_ckpt[0].split("at step ")[1].split(";")[0]) < steps
    check_outputs(app["root"] / "cut", log_cut)
    a = load_file(str(app["root"] / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(app["root"] / "cut" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), "preempted + resumed run differs from the uninterrupted one"


def test_dead_rank_ends_the_job(cluster, app, tmp_path):
    """kill -9 one training rank: the whole 2-node job must end (FAILED) quickly, not hang to the time limit."""
    import psutil

    cfg = config(app, "dead", steps=5000)
    log = tmp_path / "dead.out"
    job = sbatch(cluster, "slurm/train_torchrun.sbatch", cfg, log)
    metrics = app["root"] / "dead" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.1)
    workers = [
        p
        for p in psutil.process_iter(["cmdline"])
        if p.info["cmdline"]
        and str(cfg) in p.info["cmdline"]
        and "ortho_lora_dist.cli" in p.info["cmdline"]
        and not any("torchrun" in c for c in p.info["cmdline"])
        and "launch" not in p.info["cmdline"]
    ]
    assert len(workers) == 2, [w.info["cmdline"] for w in workers]
    start = time.time()
    workers[1].kill()
    assert wait_done(cluster, job, log, timeout=240) == "FAILED", log.read_text()[-3000:]
    assert time.time() - start < 120, "the job outlived a dead rank by more than 2 minutes"
