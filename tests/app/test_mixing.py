"""Mixing tasks of very different sizes: the epoch plan says before training how often each task is seen; explicit
sampling weights; max_epochs caps a small task; init_adapter warm-starts a run from a saved adapter."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ortho_lora_dist.cli import main as cli
from ortho_lora_dist.data.sampling import MultiTaskSampler, task_probabilities
from tests.app.test_app import make_config


def test_plan_shows_how_often_each_task_repeats():
    s = MultiTaskSampler([12_000, 400], batch=8, seed=0, world=2)
    plan = s.plan(steps=750, accum=1, names=["big", "small"])
    assert plan.splitlines() == [
        "epoch plan: 750 steps of 750 per epoch (equal sampling); per step 16 samples of each task (8 per rank x 2 "
        "ranks x 1 accumulation)",
        "  big: 12,000 samples, 12,000 seen = 1.00 passes",
        "  small: 400 samples, 12,000 seen = 30.00 passes",
    ]
    capped = MultiTaskSampler([12_000, 400], batch=8, seed=0, world=2, max_epochs=[None, 2])
    assert capped.plan(750, 1, ["big", "small"]).splitlines()[2] == (
        "  small: 400 samples, 800 seen = 2.00 passes, capped at 800 (max_epochs)"
    )


@pytest.mark.parametrize("mode", ["equal", "weighted"])
def test_a_capped_task_leaves_the_batches_after_its_passes(mode):
    s = MultiTaskSampler([40, 8], batch=2, seed=0, mode=mode, weights=[1.0, 1.0], max_epochs=[None, 1.5])
    counts = Counter()
    for _ in range(40):
        counts.update(t for t, _ in s.next())
    assert counts[1] == 12  # 1.5 passes over 8 samples, then none
    assert s.seen(1) == 12 and s.active() == [True, False]


def test_weighted_probabilities_follow_the_weights():
    assert task_probabilities([10, 1000], "weighted", weights=[3.0, 1.0]) == [0.75, 0.25]
    s = MultiTaskSampler([100, 100], batch=50, seed=1, mode="weighted", weights=[9.0, 1.0])
    drawn = Counter(t for _ in range(20) for t, _ in s.next())
    assert 0.85 < drawn[0] / (drawn[0] + drawn[1]) < 0.95


@pytest.mark.slow
def test_init_adapter_warm_starts_and_refuses_a_mismatch(env, tmp_path, caplog, capsys):  # noqa: F811
    first = make_config(env, tmp_path / "first", steps=3, plots=False)
    assert cli(["train", str(first)]) == 0
    saved = load_file(str(tmp_path / "first" / "adapter" / "adapter_model.safetensors"))
    second = make_config(env, tmp_path / "second", steps=1, plots=False, lr=1e-12, schedule="constant")
    cfg = yaml.safe_load(second.read_text())
    cfg["train"]["init_adapter"] = str(tmp_path / "first" / "adapter")
    second.write_text(yaml.safe_dump(cfg))
    with caplog.at_level(logging.INFO, logger="ortho_lora_dist"):
        assert cli(["train", str(second)]) == 0
    assert any("warm start: LoRA weights from" in r.getMessage() for r in caplog.records)
    assert any("epoch plan: 1 steps" in r.getMessage() for r in caplog.records)
    after = load_file(str(tmp_path / "second" / "adapter" / "adapter_model.safetensors"))
    assert after.keys() == saved.keys()
    for k in saved:  # one step at lr 1e-12 from the warm start: the saved weights
        torch.testing.assert_close(after[k], saved[k], rtol=0, atol=1e-9)
    heads = load_file(str(tmp_path / "second" / "adapter" / "heads.safetensors"))
    first_heads = load_file(str(tmp_path / "first" / "adapter" / "heads.safetensors"))
    for k in first_heads:
        torch.testing.assert_close(heads[k], first_heads[k], rtol=0, atol=1e-9)
    cfg["lora"]["r"] = 2
    cfg["output_dir"] = str(tmp_path / "third")
    second.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert cli(["train", str(second)]) == 2
    err = capsys.readouterr().err
    assert "train.init_adapter:" in err and "does not fit this run's LoRA" in err and "Traceback" not in err
