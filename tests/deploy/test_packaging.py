"""The built wheel works on its own, outside the clone: its files, `ortho-lora --version`, `init` and a short train.

The wheel is built from a copy of the package's sources (the clone stays untouched) and installed with
--no-deps into a fresh virtualenv whose other dependencies (torch, transformers, ...) come from the test
interpreter's site-packages through a .pth line (that line adds the folder to sys.path but runs none of its
.pth files, so the clone's editable install cannot shadow the wheel). Every command runs from a folder
outside the clone, with no PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "ortho_lora_dist", "launcher", "ds_configs", "configs", "slurm")
pytestmark = pytest.mark.slow


def run(cmd, cwd, env_vars, timeout=240, ok=True):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env_vars, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, f"{cmd}:\n{(proc.stdout + proc.stderr)[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        item = ROOT / name
        if item.is_dir():
            shutil.copytree(item, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        else:
            shutil.copy2(item, src / name)
    out = tmp_path_factory.mktemp("dist")
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", out, src],
        src,
        {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        timeout=120,
    )
    (whl,) = out.glob("ortho_lora_dist-*.whl")
    return whl


def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("launcher/")], "no top-level launcher package in site-packages"
    for need in (
        "ortho_lora_dist/launcher/plan.py",
        "ortho_lora_dist/launcher/run.py",
        "ortho_lora_dist/launcher/slurm.py",
        "ortho_lora_dist/templates/ds_configs/zero2.json",
        "ortho_lora_dist/templates/ds_configs/zero2_offload.json",
        "ortho_lora_dist/templates/configs/demo.yaml",
        "ortho_lora_dist/templates/configs/qlora7b_chat.yaml",
        "ortho_lora_dist/templates/slurm/common.sh",
        "ortho_lora_dist/templates/slurm/train_torchrun.sbatch",
        "ortho_lora_dist/templates/slurm/train_deepspeed.sbatch",
        "ortho_lora_dist/templates/slurm/train_single_node.sbatch",
    ):
        assert need in names, need
    # every subpackage and module of the clone is in the wheel (pyproject.toml lists the packages explicitly)
    for py in (ROOT / "ortho_lora_dist").rglob("*.py"):
        if "__pycache__" not in py.parts:
            assert py.relative_to(ROOT).as_posix() in names, f"{py.relative_to(ROOT)} is missing from the wheel"
    top = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top).decode().split() == ["ortho_lora_dist"]


def test_installed_wheel_outside_the_clone(wheel, env, tmp_path):  # noqa: F811
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, dict(os.environ))
    py = venv / "bin" / "python"
    run(
        [sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", wheel],
        tmp_path,
        {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    purelib = run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, dict(os.environ)
    ).stdout.strip()
    Path(purelib, "_test_dependencies.pth").write_text("".join(p + "\n" for p in site.getsitepackages()))
    work = tmp_path / "work"  # outside the clone
    work.mkdir()
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ORTHO_LORA_VERBOSE")}
    clean.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")

    where = run(
        [
            py,
            "-c",
            "import ortho_lora_dist, ortho_lora_dist.launcher.plan as p; print(ortho_lora_dist.__file__); "
            "print(p.__file__)",
        ],
        work,
        clean,
    ).stdout.split()
    assert all(Path(w).is_relative_to(venv) for w in where), where
    assert run([py, "-c", "import launcher"], work, clean, ok=False).returncode != 0
    cli = venv / "bin" / "ortho-lora"
    import ortho_lora_dist

    assert run([cli, "--version"], work, clean).stdout.strip() == f"ortho-lora {ortho_lora_dist.__version__}"

    # init: a starter config, the DeepSpeed config it names, the SLURM scripts; no overwrite without --force
    written = run([cli, "init", "--template", "qlora7b_chat"], work, clean).stdout
    for f in ("qlora7b_chat.yaml", "ds_configs/zero2.json", "slurm/train_torchrun.sbatch", "slurm/common.sh"):
        assert (work / f).is_file() and f in written, f
    assert "already" in run([cli, "init", "--template", "qlora7b_chat"], work, clean).stdout  # same files: a no-op
    (work / "qlora7b_chat.yaml").write_text((work / "qlora7b_chat.yaml").read_text() + "# edited\n")
    again = run([cli, "init", "--template", "qlora7b_chat"], work, clean, ok=False)
    assert again.returncode == 2 and "--force" in again.stderr
    run([cli, "init", "--template", "qlora7b_chat", "--force"], work, clean)
    assert "# edited" not in (work / "qlora7b_chat.yaml").read_text()
    printed = run([cli, "init"], work, clean).stdout  # the default template, and what to run next
    assert (work / "demo.yaml").is_file()
    assert "next:" in printed and "ortho-lora prepare-demo --out data/demo" in printed
    assert "ortho-lora train demo.yaml train.steps=3" in printed

    # a short train from another folder: relative task files resolve against the config's folder, and the
    # default deepspeed_config (ds_configs/zero2.json, not beside this config) resolves to the packaged copy
    project = work / "project"  # the config's folder
    for name, splits in env["data"].items():
        for split, f in splits.items():
            (project / "data" / name).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, project / "data" / name / f"{split}.jsonl")
    cfg = {
        "model": {"name_or_path": env["models"]["bert"], "max_length": 16},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["query", "value"]},
        "tasks": [
            {"name": n, "files": {s: f"data/{n}/{s}.jsonl" for s in ("train", "validation")}} for n in env["data"]
        ],
        "train": {"steps": 2, "per_task_batch_size": 4, "log_every": 1, "plots": False},
        "output_dir": str(tmp_path / "run"),
    }
    (project / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    elsewhere = tmp_path / "elsewhere"  # no ds_configs/ here (work/ has one, from init)
    elsewhere.mkdir()
    run([cli, "train", "../work/project/cfg.yaml"], elsewhere, clean, timeout=300)
    assert json.loads((tmp_path / "run" / "finished.json").read_text())["step"] == 2
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["tasks"][0]["files"]["train"] == str((project / "data" / "sentiment" / "train.jsonl").resolve())
    assert Path(saved["distributed"]["deepspeed_config"]).is_relative_to(venv)
