"""Failure injection: kills at given points, corrupt checkpoints, concurrent runs, bad bytes, changed configs,
diverged runs. Every test here fails without the fix it names (issue 10, items 1-13)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ortho_lora_dist.cli import main as cli
from ortho_lora_dist.config import ConfigError, load_config
from tests.app.test_app import _run, make_config


def _wait_for(proc, text: str, timeout: float = 180) -> str:
    """Read the subprocess's output until ``text`` appears; return what was read."""
    seen = ""
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen += line
        if text in line:
            return seen
    raise AssertionError(f"never saw {text!r}; output:\n{seen[-3000:]}")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _steps(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def _big_validation(env, tmp_path, n=3000) -> Path:  # noqa: F811
    """A config whose final evaluation takes seconds (many validation records), to be killed in."""
    path = make_config(env, tmp_path / "run", steps=4, plots=False)
    cfg = yaml.safe_load(path.read_text())
    src = Path(cfg["tasks"][0]["files"]["train"]).read_text().splitlines()
    big = tmp_path / "big_validation.jsonl"
    big.write_text("\n".join(src[i % len(src)] for i in range(n)) + "\n")
    cfg["tasks"][0]["files"]["validation"] = str(big)
    path.write_text(yaml.safe_dump(cfg))
    return path


# -- 1. the final stages --------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_kill_during_final_eval_loses_nothing_and_resume_completes(env, tmp_path, sig):  # noqa: F811
    path = _big_validation(env, tmp_path)
    out = tmp_path / "run"
    p = _run(["train", str(path)])
    _wait_for(p, "adapter saved to")
    time.sleep(0.5)
    t0 = time.time()
    p.send_signal(sig)
    rc = p.wait(timeout=60)
    if sig == signal.SIGTERM:
        assert rc == 0 and time.time() - t0 < 20, "SIGTERM during the final evaluation is honoured within seconds"
        assert "during the final evaluation" in p.stdout.read()
    assert not (out / "finished.json").exists(), "not marked finished before evaluation ended"
    assert (out / "adapter" / "adapter_model.safetensors").is_file(), "the trained adapter survives"
    assert (out / "checkpoints" / "step-4" / "trainer_state.json").is_file(), "a final checkpoint exists"
    before = _steps(out)
    p = _run(["train", str(path), "--resume"])
    log = p.communicate(timeout=300)[0]
    assert p.returncode == 0, log[-3000:]
    assert "already finished" not in log
    assert _steps(out) == before == [1, 2, 3, 4], "no step retrained, no duplicated log lines"
    ev = json.loads((out / "eval.json").read_text())
    assert ev["step"] == 4 and "validation" in ev
    assert json.loads((out / "finished.json").read_text())["step"] == 4
    p = _run(["train", str(path), "--resume"])
    assert p.wait(timeout=120) == 0 and "already finished" in p.stdout.read()


# -- 2. eval is read-only -----------------------------------------------------------------------------------------
def test_eval_command_leaves_the_run_untouched(env, tmp_path):  # noqa: F811
    path = make_config(env, tmp_path / "run", plots=False)
    out = tmp_path / "run"
    assert cli(["train", str(path)]) == 0
    before = _snapshot(out)
    assert cli(["eval", str(path), "--adapter", str(out)]) == 0
    after = _snapshot(out)
    assert set(after) - set(before) == {"eval-cli.json"}
    assert all(after[k] == v for k, v in before.items()), "training outputs were modified"
    ev = json.loads((out / "eval-cli.json").read_text())
    run_eval = json.loads((out / "eval.json").read_text())
    assert ev["validation"] == pytest.approx(run_eval["validation"])
    for split in ("validation", "test"):  # the same per-task losses as the run's final evaluation
        assert ev["loss"][split] == pytest.approx(run_eval["loss"][split])
    assert cli(["eval", str(path), "--adapter", str(out), "--output", str(out / "eval.json")]) == 2


# -- 3. resume compares configs; heads keyed by name ------------------------------------------------------------
def test_resume_refuses_a_changed_config_and_allows_more_steps(env, tmp_path, capsys):  # noqa: F811
    path = make_config(env, tmp_path / "run", steps=3, plots=False)
    out = tmp_path / "run"
    assert cli(["train", str(path)]) == 0
    snap = _snapshot(out)
    capsys.readouterr()
    assert cli(["train", str(path), "--resume", "train.lr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "train.lr: 0.005 in the checkpoint, 0.1 now" in err
    assert cli(["train", str(path), "--resume", "lora.r=8", "train.seed=3"]) == 2
    err = capsys.readouterr().err
    assert "lora.r: 4 in the checkpoint, 8 now" in err and "train.seed: 0 in the checkpoint, 3 now" in err
    cfg = yaml.safe_load(path.read_text())
    cfg["tasks"] = cfg["tasks"][::-1]
    swapped = tmp_path / "swapped.yaml"
    swapped.write_text(yaml.safe_dump(cfg))
    assert cli(["train", str(swapped), "--resume"]) == 2
    assert "['sentiment', 'topic'] there, ['topic', 'sentiment'] now" in capsys.readouterr().err
    assert _snapshot(out) == snap, "refusals write nothing"
    # 10: a finished run resumed with more steps continues from its final checkpoint, logs not truncated
    assert cli(["train", str(path), "--resume", "train.steps=5"]) == 0
    assert _steps(out) == [1, 2, 3, 4, 5]
    assert json.loads((out / "finished.json").read_text())["step"] == 5
    # a second plain `train` on the same output_dir is refused instead of overwriting the run
    assert cli(["train", str(path)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_heads_are_matched_by_task_name(env, tmp_path):  # noqa: F811
    from ortho_lora_dist.evaluation.loader import load_for_eval

    path = make_config(env, tmp_path / "run", steps=2, plots=False)
    assert cli(["train", str(path)]) == 0
    heads = load_file(str(tmp_path / "run" / "adapter" / "heads.safetensors"))
    cfg = load_config(path, [f"output_dir={tmp_path / 'other'}"])
    cfg.tasks = cfg.tasks[::-1]
    t = load_for_eval(cfg, tmp_path / "run" / "adapter")
    torch.testing.assert_close(t.model.heads[0].weight.detach(), heads["heads.topic.weight"], rtol=0, atol=0)
    torch.testing.assert_close(t.model.heads[1].weight.detach(), heads["heads.sentiment.weight"], rtol=0, atol=0)


# -- 4. one run per output_dir --------------------------------------------------------------------------------
@pytest.mark.slow
def test_second_run_on_the_same_output_dir_is_refused(env, tmp_path):  # noqa: F811
    path = make_config(env, tmp_path / "run", steps=400, plots=False, checkpoint_every=50)
    p = _run(["train", str(path)])
    try:
        deadline = time.time() + 120
        while not (tmp_path / "run" / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.1)
        q = _run(["train", str(path), "--resume"])
        msg = q.communicate(timeout=120)[0]
        assert q.returncode == 2, msg[-2000:]
        assert f"in use by pid {p.pid} on host" in msg
        assert p.poll() is None, "the first run is unharmed"
    finally:
        p.kill()
        p.wait()
    from ortho_lora_dist.training.run_dir import RunLock

    lock = RunLock(tmp_path / "run")  # a SIGKILLed holder released the lock
    lock.acquire()
    lock.release()


# -- 5. checksums, fallback ------------------------------------------------------------------------------------
def test_corrupt_latest_checkpoint_falls_back_with_a_warning(env, tmp_path, capsys, caplog):  # noqa: F811
    path = make_config(env, tmp_path / "run", steps=6, checkpoint_every=2, keep_checkpoints=0, plots=False)
    out = tmp_path / "run"
    assert cli(["train", str(path)]) == 0
    good = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    state = json.loads((out / "checkpoints" / "step-6" / "trainer_state.json").read_text())
    assert {"optimizer.pt", "rng0.safetensors", "adapter/adapter_model.safetensors"} <= set(state["files"])
    for f in ("finished.json", "eval.json"):
        (out / f).unlink()
    opt = out / "checkpoints" / "step-6" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:100])  # truncated
    assert cli(["train", str(path), "--resume"]) == 0
    assert "step-6 is not usable" in caplog.text and "optimizer.pt does not match its checksum" in caplog.text
    assert "resumed from" in caplog.text and "step-4" in caplog.text
    again = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(good[k], again[k]) for k in good), "steps 5-6 redone exactly"
    for step in (2, 4, 6):
        rng = out / "checkpoints" / f"step-{step}" / "rng0.safetensors"
        rng.write_bytes(b"garbage")
    (out / "finished.json").unlink()
    capsys.readouterr()
    assert cli(["train", str(path), "--resume"]) == 2
    assert "no usable checkpoint" in capsys.readouterr().err


# -- 6. runs that trained nothing or diverged ------------------------------------------------------------------
def test_nan_labels_refused_and_diverged_runs_fail(env, tmp_path, capsys):  # noqa: F811
    d = tmp_path / "reg"
    d.mkdir()
    rows = [{"text": "good movie", "label": 1.0}, {"text": "bad film", "label": float("nan")}] * 8
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = yaml.safe_load(make_config(env, tmp_path / "nan").read_text())
    cfg["tasks"][1] = {
        "name": "score",
        "files": {"train": str(d / "train.jsonl")},
        "type": "regression",
        "metric": "pearson",
    }
    path = tmp_path / "nan.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli(["train", str(path)]) == 2
    assert "train.jsonl, line 2: regression label is nan" in capsys.readouterr().err
    assert not (tmp_path / "nan").exists()

    path = make_config(env, tmp_path / "div", steps=6, plots=False)
    assert cli(["train", str(path), "train.lr=1e30"]) == 1
    err = capsys.readouterr().err
    assert "the run failed" in err and ("non-finite" in err or "skipped" in err)
    assert not (tmp_path / "div" / "finished.json").exists()
    ev_file = tmp_path / "div" / "eval.json"
    if ev_file.exists():  # written, but never a number computed from NaN outputs
        ev = json.loads(ev_file.read_text())
        assert any(v is None for split in ("validation", "test") for v in ev.get(split, {}).values())

    path = make_config(env, tmp_path / "skips", steps=6, plots=False)
    assert cli(["train", str(path), "train.lr=1e30", "train.max_consecutive_skips=1"]) == 2
    err = capsys.readouterr().err
    assert (
        "Traceback" not in err
        and err.strip().splitlines()[-1].startswith("error: ")
        and "in a row had a NaN/Inf" in err
    )


# -- 7/8. bad input: one error, rc 2 ---------------------------------------------------------------------------------
def test_bad_bytes_and_paths_are_one_clear_error(env, tmp_path, capsys):  # noqa: F811
    path = make_config(env, tmp_path / "run")
    cfg = yaml.safe_load(path.read_text())
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_bytes(path.read_bytes() + b"# caf\xe9\n")
    assert cli(["train", str(bad_yaml)]) == 2
    assert "bad.yaml, line" in capsys.readouterr().err
    for suffix, body in (
        (".jsonl", b'{"text": "a", "label": "x"}\n{"text": "caf\xe9", "label": "y"}\n'),
        (".csv", b"text,label\na,x\ncaf\xe9,y\n"),
    ):
        f = tmp_path / f"latin1{suffix}"
        f.write_bytes(body)
        c = json.loads(json.dumps(cfg))
        c["tasks"][0]["files"] = {"train": str(f)}
        p = tmp_path / f"c{suffix}.yaml"
        p.write_text(yaml.safe_dump(c))
        assert cli(["train", str(p)]) == 2
        err = capsys.readouterr().err
        assert f"latin1{suffix}, line" in err and "not UTF-8" in err, err
    assert cli(["train", str(path), f"model.name_or_path={tmp_path}/no/such/model"]) == 2
    assert "local model directory" in capsys.readouterr().err
    assert cli(["train", str(path), "model.name_or_path=nobody-xyz/no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "is not a local folder" in err and "local folder's path" in err
    c = json.loads(json.dumps(cfg))
    c["tasks"][0] = {"name": "hub", "dataset": "nobody-xyz/no-such-dataset"}
    p = tmp_path / "hub.yaml"
    p.write_text(yaml.safe_dump(c))
    assert cli(["train", str(p)]) == 2
    assert "task 'hub': dataset 'nobody-xyz/no-such-dataset' is not a local folder" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_override_errors_name_the_override_and_hint_familiar_names(env, tmp_path):  # noqa: F811
    path = make_config(env, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"override 'model.name_or_path.foo=1': 'model.name_or_path' is a value"):
        load_config(path, ["model.name_or_path.foo=1"])
    with pytest.raises(ConfigError, match=r"override 'tasks.9=x': 'tasks.9' does not exist .*indices 0..1"):
        load_config(path, ["tasks.9=x"])
    with pytest.raises(ConfigError, match=r"override 'train.lr=abc': 'train.lr'"):
        load_config(path, ["train.lr=abc"])
    with pytest.raises(ConfigError, match=r"unknown key 'train.lrate' \(did you mean 'train.lr'\?\)"):
        load_config(path, ["train.lrate=1"])
    for ours, theirs in (
        ("train.lr", "learning_rate"),
        ("train.epochs", "num_train_epochs"),
        ("train.steps", "max_steps"),
        ("train.gradient_accumulation", "gradient_accumulation_steps"),
        ("lora.r", "lora_r"),
        ("train.keep_checkpoints", "save_total_limit"),
        ("model.dtype: bfloat16", "bf16"),
    ):
        with pytest.raises(ConfigError, match=f"did you mean '{ours}'"):
            load_config(path, [f"train.{theirs}=1"])
    cfg = yaml.safe_load(path.read_text())
    cfg["train"].pop("steps")
    cfg["train"]["epochs"] = 2
    path.write_text(yaml.safe_dump(cfg))
    c = load_config(path, ["train.steps=7"])
    assert c.train.steps == 7 and c.train.epochs is None


# -- 9. a stop signal while loading ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_while_loading_exits_cleanly(env, tmp_path):  # noqa: F811
    path = make_config(env, tmp_path / "run")
    p = _run(["train", str(path)])
    time.sleep(1.5)  # imports / data / model loading
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=60)[0]
    assert p.returncode == 0, out[-2000:]
    assert "nothing was written" in out
    assert not (tmp_path / "run").exists()


# -- 10. retention, no duplicated log lines after SIGKILL ---------------------------------------------------------
@pytest.mark.slow
def test_sigkill_resume_keeps_logs_unique_and_prunes_checkpoints(env, tmp_path):  # noqa: F811
    path = make_config(env, tmp_path / "run", steps=60, checkpoint_every=7, plots=False)
    out = tmp_path / "run"
    p = _run(["train", str(path)])
    deadline = time.time() + 200
    while time.time() < deadline and len(list((out / "checkpoints").glob("step-*"))) < 2:
        time.sleep(0.05)
    time.sleep(0.5)
    p.kill()
    p.wait()
    logged = _steps(out)
    kept = sorted(int(c.name.split("-")[1]) for c in (out / "checkpoints").glob("step-*"))
    assert len(kept) <= 2, "keep_checkpoints defaults to 2"
    p = _run(["train", str(path), "--resume"])
    log = p.communicate(timeout=400)[0]
    assert p.returncode == 0, log[-2000:]
    assert logged[-1] >= kept[-1]
    assert _steps(out) == list(range(1, 61)), "no duplicated or missing steps"
    assert sorted(c.name for c in (out / "checkpoints").glob("step-*")) == ["step-56", "step-60"]


# -- 12. very long texts ------------------------------------------------------------------------------------------
def test_very_long_texts_are_cut_before_tokenizing(env, tmp_path):  # noqa: F811
    from ortho_lora_dist.data.loading import load_tasks
    from ortho_lora_dist.models.build import load_run_model

    cfg = load_config(make_config(env, tmp_path / "run"))
    model = load_run_model(cfg, load_tasks(cfg.tasks), torch.device("cpu"), 1)  # as a run builds it
    huge = "word " * 1_000_000  # 5 MB
    t0 = time.perf_counter()
    batch = model.collate([{"text": huge, "label": 0}] * 3, [0, 0, 0])
    assert time.perf_counter() - t0 < 2.0
    assert batch["input_ids"].shape[1] == cfg.model.max_length


def test_resume_accepts_a_checkpoint_written_before_new_keys_existed():
    """A key added in a later version takes its default when the older checkpoint config is compared."""
    from ortho_lora_dist.config import validate_config
    from ortho_lora_dist.training.resume import ResumeMismatch, check_resume

    tree = {"model": {"name_or_path": "m"}, "tasks": [{"name": "a", "files": {"train": "a.jsonl"}}]}
    current = validate_config(tree).model_dump()
    saved = json.loads(json.dumps(current))
    del saved["train"]["max_consecutive_skips"], saved["tasks"][0]["loss_weight"]  # as if written before they existed
    check_resume(saved, current, 1, 1, "ckpt")
    saved["train"]["lr"] = 1.0
    with pytest.raises(ResumeMismatch, match="train.lr"):
        check_resume(saved, current, 1, 1, "ckpt")
