"""The training application: config and data validation, end-to-end runs, outputs, eval, resume."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ortho_lora_dist.cli import main as cli
from ortho_lora_dist.config import ConfigError, TaskConfig, load_config
from ortho_lora_dist.data.loading import DataError, load_task

ROOT = Path(__file__).resolve().parents[2]


def make_config(env, out, kind="encoder-classification", **train):
    d = env["data"]
    tasks = [{"name": n, "files": d[n], "metric": "accuracy"} for n in ("sentiment", "topic")]
    model = {"name_or_path": env["models"]["bert"], "kind": kind, "max_length": 16}
    lora = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["query", "value"]}
    if kind == "causal-lm":
        model["name_or_path"] = env["models"]["llama"]
        lora["target_modules"] = "all-linear"
        tasks[0].update(prompt="review: {text} verdict:", label_words={"pos": " good", "neg": " bad"})
        tasks[1].update(type="generation", metric="exact_match", prompt="text: {text} topic:")
    cfg = {
        "model": model,
        "lora": lora,
        "tasks": tasks,
        "train": {"lr": 5e-3, "steps": 6, "per_task_batch_size": 4, "log_every": 1, "seed": 0, **train},
        "output_dir": str(out),
    }
    path = Path(out).parent / f"{Path(out).name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


# -- config -----------------------------------------------------------------------------------------------
def test_config_errors_name_the_key(env, tmp_path):
    path = make_config(env, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"unknown key 'train.lrr' \(did you mean 'lr'\?\)"):
        load_config(path, ["train.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"'train.per_task_batch_size': .*integer"):
        load_config(path, ["train.per_task_batch_size=many"])
    cfg = load_config(path, ["train.lr=1e-4", "tasks.1.loss_weight=2"])
    assert cfg.train.lr == 1e-4 and cfg.tasks[1].loss_weight == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name_or_path: x\n tasks: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml, line \d+: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    dup = yaml.safe_load(path.read_text())
    dup["tasks"][1]["name"] = "sentiment"
    path.write_text(yaml.safe_dump(dup))
    with pytest.raises(ConfigError, match="duplicate task names: sentiment"):
        load_config(path)


# -- data -------------------------------------------------------------------------------------------------
def test_data_errors_name_file_and_line(tmp_path):
    f = tmp_path / "t.jsonl"

    def task(**kw):
        return TaskConfig(name="t", files={"train": str(f)}, **kw)

    with pytest.raises(DataError, match="does not exist"):
        load_task(task())
    f.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": \n')
    with pytest.raises(DataError, match=r"t.jsonl, line 2: not valid JSON"):
        load_task(task())
    f.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "c", "label": "z"}\n')
    with pytest.raises(DataError, match=r"t.jsonl, line 3: label 'z' is not in the label set \['x', 'y'\]"):
        load_task(task(labels=["x", "y"]))
    with pytest.raises(DataError, match=r"line 1: sequence-pair field 'premise' is missing"):
        load_task(task(text_pair_field="premise"))
    f.write_text("\n")
    with pytest.raises(DataError, match=r"data file .*t.jsonl is empty"):
        load_task(task())


def test_cli_reports_bad_input_with_exit_code_2(env, tmp_path, capsys):
    path = make_config(env, tmp_path / "run")
    assert cli(["train", str(path), "train.stepz=3"]) == 2
    assert "unknown key 'train.stepz' (did you mean 'steps'?)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists(), "nothing half-written"


def test_target_modules_matching_nothing(env, tmp_path):
    from ortho_lora_dist.training.recipe import Trainer

    cfg = load_config(make_config(env, tmp_path / "run"), ["lora.target_modules=[qkv_proj]"])
    with pytest.raises(ValueError, match=r"matched no module .* linear layers it has: .*query"):
        Trainer(cfg)


def test_tokenizer_without_pad_token_gets_one(env, caplog):
    from ortho_lora_dist.config import ModelConfig
    from ortho_lora_dist.models.loading import load_tokenizer

    with caplog.at_level(logging.INFO, logger="ortho_lora_dist"):  # information, nothing to act on: INFO
        tok = load_tokenizer(ModelConfig(name_or_path=env["models"]["llama"]))
    assert tok.pad_token == "</s>"
    assert "no pad token" in caplog.text


# -- end to end -------------------------------------------------------------------------------------------
def test_encoder_run_outputs(env, tmp_path):
    out = tmp_path / "run"
    path = make_config(env, out, checkpoint_every=3)
    assert cli(["train", str(path)]) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    for key in (
        "loss",
        "lr",
        "grad_norm",
        "conflict_rate/A",
        "conflict_rate/B",
        "cosine/A",
        "cosine/B",
        "skipped_steps",
    ):
        assert key in steps[0], key
    assert set(steps[0]["loss"]) == {"sentiment", "topic"}
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["validation"]) == {"sentiment", "topic", "average"} and "test" in ev
    for f in ("loss.png", "conflicts.png", "leverage.png", "blocks.json", "config.yaml"):
        assert (out / f).is_file(), f
    assert list((out / "tensorboard").iterdir())
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-3", "step-6"]
    # the adapter loads with PEFT itself
    from peft import PeftModel
    from transformers import AutoModel

    base = AutoModel.from_pretrained(env["models"]["bert"], add_pooling_layer=False)
    peft = PeftModel.from_pretrained(base, str(out / "adapter"))
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    name = next(k for k in saved if "lora_A" in k)
    loaded = dict(peft.named_parameters())[name.replace(".weight", ".default.weight")]
    torch.testing.assert_close(loaded, saved[name])
    heads = load_file(str(out / "adapter" / "heads.safetensors"))
    assert set(heads) == {"heads.sentiment.weight", "heads.sentiment.bias", "heads.topic.weight", "heads.topic.bias"}
    # eval reproduces the end-of-run numbers
    assert cli(["eval", str(path), "--adapter", str(out), "--output", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["validation"] == pytest.approx(ev["validation"])


def test_causal_lm_run(env, tmp_path):
    out = tmp_path / "lm"
    assert cli(["train", str(make_config(env, out, kind="causal-lm"))]) == 0
    ev = json.loads((out / "eval.json").read_text())["validation"]
    assert 0 <= ev["sentiment"] <= 1 and 0 <= ev["topic"] <= 1


def _run(args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "ortho_lora_dist.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_is_bit_identical(env, tmp_path):
    steps = 150
    full = make_config(env, tmp_path / "full", steps=steps, log_every=1, plots=False)
    cut = make_config(env, tmp_path / "cut", steps=steps, log_every=1, plots=False)
    p = _run(["train", str(full)])
    assert p.wait(timeout=300) == 0, p.stdout.read()[-3000:]

    p = _run(["train", str(cut)])
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 0, p.stdout.read()[-3000:]
    ckpts = list((tmp_path / "cut" / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and 0 < int(ckpts[0].name.split("-")[1]) < steps, "stopped mid-run with one checkpoint"
    assert not (tmp_path / "cut" / "adapter").exists()

    p = _run(["train", str(cut), "--resume"])
    assert p.wait(timeout=300) == 0, p.stdout.read()[-3000:]
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from uninterrupted"
    ha = load_file(str(tmp_path / "full" / "adapter" / "heads.safetensors"))
    hb = load_file(str(tmp_path / "cut" / "adapter" / "heads.safetensors"))
    assert all(torch.equal(ha[k], hb[k]) for k in ha)


def test_compare_is_complete_and_resumable(env, tmp_path, caplog):
    from ortho_lora_dist.study.compare import compare

    cfg = load_config(make_config(env, tmp_path / "cmp", steps=3))
    out = tmp_path / "cmp-compare"
    methods = ["single", "joint", "ortho-factor", "norm_balance-global", "famo-global", "lossweights"]
    s = compare(cfg, 2, out, methods, eval_every=1)
    assert s["split"] == "test"
    assert "--resume: no checkpoint" not in caplog.text  # fresh runs start fresh, without the resume warning
    assert set(s["methods"]) == set(methods)
    e = s["methods"]["ortho-factor"]
    assert set(e["per_task"]) == {"sentiment", "topic"} and "gap_recovery" in e and e["time_vs_joint"] > 0
    assert 0 <= e["conflict_rate"] <= 1
    nb = s["methods"]["norm_balance-global"]
    assert len(nb["paired_vs_joint"]["per_seed"]) == 2 and 0 <= nb["change"] and -1 <= nb["cos_joint"] <= 1
    grid = s["lossweights"]["grid"]
    assert [g["tag"] for g in grid] == ["uniform", "x3-sentiment", "x3-topic"]
    assert s["lossweights"]["chosen"]["validation_average"] == max(g["validation_average"] for g in grid)
    # validation curves (steps 1, 2 and the final 3) and time to joint's best validation average
    assert [st for st, _ in s["methods"]["joint"]["curve"]] == [1, 2, 3] and "curve" not in s["methods"]["single"]
    for m in ("joint", "ortho-factor", "famo-global"):
        tt = s["methods"][m]["time_to_target"]
        assert tt["seeds"] == 2 and len(tt["target"]) == 2 and all(js in (1, 2, 3) for js in tt["joint_steps"])
        assert tt["reached"] == sum(st is not None for st in tt["steps"]) == len(tt["paired_steps"])
    joint_tt = s["methods"]["joint"]["time_to_target"]
    assert joint_tt["reached"] == 2 and joint_tt["paired_steps"] == [0, 0], "joint reaches its own best"
    famo = s["methods"]["famo-global"]
    assert famo["time_vs_joint"] > 0 and "paired_vs_joint" in famo and math.isnan(famo["conflict_rate"])
    assert "steps to target" in (out / "compare.md").read_text()
    with pytest.raises(ValueError, match="unknown method 'upgard-global'"):
        compare(cfg, 1, out, ["upgard-global"])
    for f in ("compare.json", "compare.md", "compare.png"):
        assert (out / f).is_file()
    assert sorted(p.name for p in (out / "runs" / "single" / "seed0").iterdir()) == ["sentiment", "topic"]
    stamp = (out / "runs" / "joint" / "seed1" / "eval.json").stat().st_mtime
    compare(cfg, 2, out, methods)  # finished runs are not redone
    assert (out / "runs" / "joint" / "seed1" / "eval.json").stat().st_mtime == stamp


def test_compare_scores_a_subset_of_tasks(env, tmp_path, capsys):
    """--score: the average, paired differences, validation average and curves over the scored tasks only."""
    from ortho_lora_dist.study.compare import UnknownTask, compare

    path = make_config(env, tmp_path / "sc", steps=2)
    cfg, out = load_config(path), tmp_path / "sc-compare"
    s = compare(cfg, 2, out, ["single", "joint", "norm_balance-global"], eval_every=1, score=["topic"])
    assert s["scored"] == ["topic"] and s["tasks"] == ["sentiment", "topic"]

    def ev(method, seed, split="test"):
        return json.loads((out / "runs" / method / f"seed{seed}" / "eval.json").read_text())[split]["topic"]

    nb, joint = s["methods"]["norm_balance-global"], s["methods"]["joint"]
    assert joint["average"]["mean"] == pytest.approx(joint["per_task"]["topic"]["mean"], abs=1e-12)
    assert nb["paired_vs_joint"]["per_seed"] == pytest.approx(
        [ev("norm_balance-global", k) - ev("joint", k) for k in (0, 1)], abs=1e-12
    )
    val = (ev("joint", 0, "validation") + ev("joint", 1, "validation")) / 2
    assert joint["validation_average"] == pytest.approx(val, abs=1e-12)
    assert joint["curve"][-1][1] == pytest.approx(val, abs=1e-9), "the curves average the scored task only"
    single = s["methods"]["single"]
    assert single["average"]["mean"] == pytest.approx(single["per_task"]["topic"]["mean"], abs=1e-12)
    assert "average = topic only (--score)" in (out / "compare.md").read_text()
    # joint's geometry: the per-step shares and cosines of metrics.jsonl, averaged over steps, then seeds
    logged = [
        [json.loads(x) for x in (out / "runs" / "joint" / f"seed{k}" / "metrics.jsonl").read_text().splitlines()]
        for k in (0, 1)
    ]
    logged = [[r for r in rs if "share" in r] for rs in logged]
    g = joint["geometry"]
    for key, pick in (("topic", lambda r: r["share"]["topic"]), ("all", lambda r: r["cosine/all"])):
        want = sum(sum(map(pick, rs)) / len(rs) for rs in logged) / 2
        got = g["share"]["topic"] if key == "topic" else g["cosine"]["all"]
        assert got == pytest.approx(want, abs=1e-12), key
    assert sum(g["share"].values()) == pytest.approx(1.0, abs=1e-5) and "geometry" not in s["methods"]["single"]
    assert "joint's task gradients" in (out / "compare.md").read_text()
    full = compare(cfg, 2, out, ["single", "joint", "norm_balance-global"])  # the same runs, every task averaged
    assert full["scored"] == ["sentiment", "topic"] and full["methods"]["joint"]["average"]["mean"] == pytest.approx(
        (joint["per_task"]["sentiment"]["mean"] + joint["per_task"]["topic"]["mean"]) / 2
    )
    with pytest.raises(UnknownTask, match="unknown task 'topik'"):
        compare(cfg, 1, out, ["joint"], score=["topik"])
    assert cli(["compare", str(path), "--score", "topik", "--methods", "joint", "--out", str(tmp_path / "x")]) == 2
    assert "--score: unknown task 'topik'" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["demo", "study", "paper_glue", "qlora7b_chat"])
def test_shipped_configs_validate(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.tasks and cfg.output_dir
