"""Hardening, round two (issue 17): every bad input a user can give is one line naming the key, file or row
(exit 2, no traceback, nothing written); strict JSON everywhere; quiet, truthful logs. Each test fails without
the fix it names."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import yaml

from ortho_lora_dist.cli import main as cli
from ortho_lora_dist.config import ConfigError, load_config
from ortho_lora_dist.data.loading import DataError, load_task
from tests.app.test_app import _run, make_config

ROOT = Path(__file__).resolve().parents[2]


def _fails_cleanly(capsys, args: list[str], *expected: str) -> str:
    """``ortho-lora ARGS`` exits 2 with one error line containing every ``expected`` text and no traceback."""
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(last) == 1 and all(e in last[0] for e in expected), err
    return last[0]


def _config(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


# -- 1. tracebacks -> one line ------------------------------------------------------------------------------
def test_model_folders_with_missing_pieces(env, tmp_path, capsys):
    path = make_config(env, tmp_path / "run")
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    _fails_cleanly(capsys, ["train", str(path), f"model.name_or_path={empty}"], "model.name_or_path", "config.json")
    no_weights = tmp_path / "no-weights"
    shutil.copytree(env["models"]["bert"], no_weights)
    for f in no_weights.glob("*.safetensors"):
        f.unlink()
    _fails_cleanly(capsys, ["train", str(path), f"model.name_or_path={no_weights}"], "cannot load the model")
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(env["models"]["bert"], no_tokenizer)
    for f in no_tokenizer.iterdir():
        if "token" in f.name or f.name == "vocab.txt" or f.name == "special_tokens_map.json":
            f.unlink()
    _fails_cleanly(capsys, ["train", str(path), f"model.name_or_path={no_tokenizer}"], "has no tokenizer files")
    odd = tmp_path / "odd-architecture"
    shutil.copytree(env["models"]["bert"], odd)
    conf = json.loads((odd / "config.json").read_text())
    conf["model_type"] = "no-such-architecture"
    (odd / "config.json").write_text(json.dumps(conf))
    _fails_cleanly(capsys, ["train", str(path), f"model.name_or_path={odd}"], "model.name_or_path")
    assert not (tmp_path / "run").exists()


def test_generation_task_on_an_encoder_is_a_config_error(env, tmp_path, capsys):
    tree = yaml.safe_load(make_config(env, tmp_path / "run").read_text())
    tree["tasks"][1].update(format="alpaca")
    expected = r"tasks.1 \('topic'\): format 'alpaca' makes it a generation task.*causal-lm"
    with pytest.raises(ConfigError, match=expected):
        load_config(_config(tmp_path / "g.yaml", tree))
    tree["tasks"][1] = {**tree["tasks"][1], "format": "text", "type": "generation", "metric": "exact_match"}
    _fails_cleanly(capsys, ["train", str(_config(tmp_path / "g2.yaml", tree))], "tasks.1", "type: generation")
    tree = yaml.safe_load(make_config(env, tmp_path / "lm", kind="causal-lm").read_text())
    tree["tasks"][0].pop("label_words")
    with pytest.raises(ConfigError, match=r"tasks.0 \('sentiment'\): a classification task on a causal LM needs"):
        load_config(_config(tmp_path / "lm.yaml", tree))


def test_output_dir_that_cannot_be_a_folder(env, tmp_path, capsys):
    path = make_config(env, tmp_path / "run")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    _fails_cleanly(capsys, ["train", str(path), f"output_dir={a_file}"], f"output_dir {a_file} is a file")
    _fails_cleanly(capsys, ["train", str(path), f"output_dir={a_file}/run"], "output_dir", f"{a_file} is a file")
    assert a_file.read_text() == "x"


def test_target_modules_matching_nothing(env, tmp_path, capsys):
    path = make_config(env, tmp_path / "run")
    _fails_cleanly(capsys, ["train", str(path), "lora.target_modules=[nothing_here]"], "lora.target_modules")
    assert not (tmp_path / "run").exists()


# -- 2. rows numbered from 1 ----------------------------------------------------------------------------------
def test_json_array_names_the_row_from_one(tmp_path):
    f = tmp_path / "a.json"
    f.write_text(json.dumps([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}, "oops"]))
    with pytest.raises(DataError, match=r"a.json, row 3: expected a JSON object, got str"):
        load_task(_task(f))
    f.write_text('[{"text": "a", "label": "x"},\n {"text": "b" "label": "y"}]')
    with pytest.raises(DataError, match=r"a.json, line 2: not valid JSON"):
        load_task(_task(f))


def test_bom_accepted_empty_files_named(tmp_path):
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    assert [r["text"] for r in load_task(_task(f)).splits["train"]] == ["a", "b"]
    for name in ("e.jsonl", "e.tsv", "e.csv", "e.json"):
        (tmp_path / name).write_text("\n" if name.endswith("l") else "")
        with pytest.raises(DataError, match=rf"data file .*{name} is empty"):
            load_task(_task(tmp_path / name))


def _task(f: Path):
    from ortho_lora_dist.config import TaskConfig

    return TaskConfig(name="t", files={"train": str(f)})


# -- 3. library noise -----------------------------------------------------------------------------------------
def test_no_library_bars_or_error_lines_around_table_sources(tmp_path, capfd):
    import datasets

    rows = [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    capfd.readouterr()
    for name in ("a.json", "p.parquet"):
        assert len(load_task(_task(tmp_path / name)).splits["train"]) == 2
    out, err = capfd.readouterr()
    assert "Generating train split" not in out + err and "%|" not in err, err
    broken = tmp_path / "broken.parquet"
    broken.write_bytes((tmp_path / "p.parquet").read_bytes()[:40])
    with pytest.raises(DataError, match=r"broken.parquet could not be read as PARQUET"):
        load_task(_task(broken))
    out, err = capfd.readouterr()
    assert "ERROR" not in err and "datasets.packaged_modules" not in err, err


# -- 4. strict JSON -------------------------------------------------------------------------------------------
def test_a_config_that_cannot_train_is_refused(env, tmp_path):
    path = make_config(env, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"lora.alpha"):
        load_config(path, ["lora.alpha=0"])
    for override in ("train.temperature=inf", "train.lr=nan", "tasks.0.loss_weight=inf"):
        with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
            load_config(path, [override])


def test_every_json_writer_goes_through_the_strict_encoder():
    """No json.dump / json.dumps in the package besides runtime/jsonio.py (which maps NaN / inf to null)."""
    offenders = []
    for py in (ROOT / "ortho_lora_dist").rglob("*.py"):
        if py.name == "jsonio.py":
            continue
        for node in ast.walk(ast.parse(py.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("dump", "dumps"):
                if isinstance(node.value, ast.Name) and node.value.id == "json":
                    offenders.append(f"{py.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders
    from ortho_lora_dist.runtime.jsonio import dumps

    assert dumps({"a": float("nan"), "b": [float("inf"), 1.5, (2.0, -float("inf"))]}) == (
        '{"a": null, "b": [null, 1.5, [2.0, null]]}'
    )


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_run_outputs_are_strict_json_and_logs_read_well(env, tmp_path):
    path = make_config(env, tmp_path / "run", steps=2, checkpoint_every=1, plots=False)
    proc = _run(["train", str(path)])  # a real process: its own logging set-up, as a user (or SLURM) sees it
    err = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, err[-3000:]
    out = tmp_path / "run"
    files = [p for p in out.rglob("*") if p.suffix in (".json", ".jsonl") and p.is_file()]
    assert len(files) >= 6
    for f in files:
        for line in f.read_text().splitlines() if f.suffix == ".jsonl" else [f.read_text()]:
            if line.strip():
                _strict(line)
    # normal progress at INFO, with a time stamp (a SLURM .out reads in order); WARNING only for what to act on
    trained = [x for x in err.splitlines() if "trained 2 steps" in x]
    assert trained and " INFO ortho_lora_dist: " in trained[0] and trained[0][:4].isdigit(), err
    assert "WARNING ortho_lora_dist" not in err, err


# -- 7. small inconsistencies -----------------------------------------------------------------------------------
def test_text_fields_read_the_same_in_training_and_predict(tmp_path):
    from ortho_lora_dist.artifacts.predict import read_records

    f = tmp_path / "t.jsonl"
    f.write_text('{"text": 42, "label": "x"}\n{"text": "b", "label": "y"}\n')
    assert load_task(_task(f)).splits["train"][0]["text"] == "42"
    meta = {"tasks": [{"name": "t", "type": "classification", "labels": ["x", "y"], "format": "text"}]}
    p = tmp_path / "in.jsonl"
    p.write_text('{"task": "t", "text": 42}\n')
    assert read_records(p, meta)[0]["text"] == "42"
    for bad, problem in (('{"text": null, "label": "x"}', "is null"), ('{"text": [1], "label": "x"}', "must be text")):
        f.write_text(bad + "\n")
        with pytest.raises(DataError, match=rf"t.jsonl, line 1: field 'text' {problem}"):
            load_task(_task(f))
        p.write_text(bad.replace('"label": "x"', '"task": "t"') + "\n")
        with pytest.raises(DataError, match=rf"in.jsonl, line 1: field 'text' {problem}"):
            read_records(p, meta)


def test_extending_a_finished_run_follows_the_schedule_of_its_new_length(env, tmp_path):
    """The documented rule: the learning-rate schedule is a function of the run's total steps, so a run extended
    from 4 to 8 steps continues on the 8-step schedule from step 5 (linear decay: 0.5 x lr at step 4 of 8)."""
    path = make_config(env, tmp_path / "run", steps=4, schedule="linear", warmup_ratio=0.0, plots=False, lr=1e-3)
    assert cli(["train", str(path)]) == 0
    assert cli(["train", str(path), "--resume", "train.steps=8"]) == 0
    lrs = {
        r["step"]: r["lr"]
        for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
        if "lr" in r
    }
    assert lrs[4] == pytest.approx(0.0, abs=1e-12), "the 4-step run decayed to 0"
    assert lrs[5] == pytest.approx(1e-3 * (8 - 5) / 8) and lrs[8] == pytest.approx(0.0, abs=1e-12)


def test_every_cli_option_has_a_help_line():
    import argparse

    from ortho_lora_dist.cli import build_parser

    missing = [
        f"{name} {action.option_strings or action.dest}"
        for sub in build_parser()._actions
        if isinstance(sub, argparse._SubParsersAction)
        for name, parser in sub.choices.items()
        for action in parser._actions
        if not action.help and not isinstance(action, argparse._HelpAction)
    ]
    assert not missing, missing


def test_a_checkpoint_write_that_fails_keeps_the_previous_one(env, tmp_path, capsys, monkeypatch):
    """Disk full at the second checkpoint: exit 1 with one line, no half-written checkpoint, step-2 still the newest
    valid one, and --resume (once the disk has room) ends exactly like an uninterrupted run."""
    from safetensors.torch import load_file

    from ortho_lora_dist.training import checkpoint as ckpt

    common = dict(steps=6, checkpoint_every=2, schedule="constant", warmup_ratio=0.0, plots=False)
    ref = make_config(env, tmp_path / "ref", **common)
    assert cli(["train", str(ref)]) == 0
    path = make_config(env, tmp_path / "run", **common)
    real, calls = ckpt.save_torch_state, []

    def full_disk(p, state):
        calls.append(p)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(p))
        real(p, state)

    monkeypatch.setattr(ckpt, "save_torch_state", full_disk)
    capsys.readouterr()
    assert cli(["train", str(path)]) == 1
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "--resume" in lines[0], err
    assert "Traceback" not in err
    out = tmp_path / "run"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"], "no half-written step-4"
    assert ckpt.newest_valid(out).name == "step-2"
    monkeypatch.setattr(ckpt, "save_torch_state", real)
    assert cli(["train", str(path), "--resume"]) == 0
    a = load_file(str(tmp_path / "ref" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
