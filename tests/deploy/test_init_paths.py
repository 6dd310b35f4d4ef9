"""`ortho-lora init` / `--version` from the clone, and relative paths in a config (resolved against its folder)."""

from __future__ import annotations

import pytest
import yaml

import ortho_lora_dist
from ortho_lora_dist.cli import main as cli
from ortho_lora_dist.config import load_config
from ortho_lora_dist.runtime.resources import packaged_file, template_dir, templates


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"ortho-lora {ortho_lora_dist.__version__}"


def test_init_writes_starter_files_and_refuses_to_overwrite(tmp_path, capsys):
    assert set(templates()) >= {"demo", "qlora7b_chat", "paper_glue"}
    assert cli(["init", "--dir", str(tmp_path), "--template", "qlora7b_chat"]) == 0
    for f in ("qlora7b_chat.yaml", "ds_configs/zero2.json", "slurm/common.sh", "slurm/train_deepspeed.sbatch"):
        assert (tmp_path / f).read_bytes() == (
            template_dir(f.split("/")[0]) if "/" in f else template_dir("configs")
        ).joinpath(f.split("/")[-1]).read_bytes(), f
    (tmp_path / "slurm" / "common.sh").write_text("# mine\n")
    capsys.readouterr()
    assert cli(["init", "--dir", str(tmp_path), "--template", "qlora7b_chat"]) == 2
    err = capsys.readouterr().err
    assert "would overwrite" in err and "common.sh" in err and "--force" in err
    assert (tmp_path / "slurm" / "common.sh").read_text() == "# mine\n", "a refusal writes nothing"
    assert cli(["init", "--dir", str(tmp_path), "--template", "qlora7b_chat", "--force"]) == 0
    assert (tmp_path / "slurm" / "common.sh").read_text() != "# mine\n"
    assert cli(["init", "--dir", str(tmp_path), "--template", "nope"]) == 2
    assert "choose from" in capsys.readouterr().err


def _config(folder, files: dict, **distributed):
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "model": {"name_or_path": "some/model"},
        "tasks": [{"name": "t", "files": files}],
        "distributed": distributed,
    }
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    project, cwd = tmp_path / "project", tmp_path / "cwd"
    (project / "data").mkdir(parents=True)
    (project / "data" / "train.jsonl").write_text("{}\n")
    (cwd / "data").mkdir(parents=True)
    (cwd / "data" / "train.jsonl").write_text("{}\n")
    (cwd / "data" / "validation.jsonl").write_text("{}\n")
    (project / "my_ds.json").write_text("{}")
    absolute = tmp_path / "elsewhere.jsonl"
    files = {"train": "data/train.jsonl", "validation": "data/validation.jsonl", "test": str(absolute)}
    path = _config(project, files, engine="deepspeed", deepspeed_config="my_ds.json")
    monkeypatch.chdir(cwd)
    cfg = load_config(path)
    got = cfg.tasks[0].files
    assert got["train"] == str(project / "data" / "train.jsonl"), "the config's folder first"
    assert got["validation"] == str(cwd / "data" / "validation.jsonl"), "then the current folder"
    assert got["test"] == str(absolute), "absolute paths as they are"
    assert cfg.distributed.deepspeed_config == str(project / "my_ds.json")
    # found nowhere: left as written (the error that follows names it so)
    cfg = load_config(_config(tmp_path / "p2", {"train": "nope/train.jsonl"}, deepspeed_config="nope.json"))
    assert cfg.tasks[0].files["train"] == "nope/train.jsonl" and cfg.distributed.deepspeed_config == "nope.json"


def test_default_deepspeed_config_works_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(_config(tmp_path / "p", {"train": "x.jsonl"}, engine="deepspeed"))
    assert cfg.distributed.deepspeed_config == str(packaged_file("ds_configs/zero2.json"))
    from ortho_lora_dist.engines.deepspeed_config import load_ds_config

    assert (
        load_ds_config(cfg.distributed.deepspeed_config, micro_batch=2, world_size=1, grad_clip=0.0)[
            "zero_optimization"
        ]["stage"]
        == 2
    )
