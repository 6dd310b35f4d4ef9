"""Time to accuracy (study/time_to_accuracy.py) on hand-made curves, a loss-only strategy end to end, and the
zero-shot row of compare."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ortho_lora_dist.cli import main as cli
from ortho_lora_dist.study.time_to_accuracy import first_reach, median, time_to_target, validation_curve
from tests.app.test_app import make_config


def test_validation_curve_reads_eval_records_only():
    records = [
        {"step": 1, "loss": {"a": 1.0, "b": 2.0}},
        {"step": 2, "eval": {"a": 0.5, "b": 0.7, "average": 0.6}},
        {"step": 4, "eval": {"a": 0.9, "b": None}},  # a non-finite task: no point
        {"step": 4, "eval": {"a": 0.8, "b": 0.8}},
        {"step": 3, "eval": {"a": 0.6, "b": 0.6}},
    ]
    assert validation_curve(records, ["a", "b"]) == [(2, 0.6), (3, 0.6), (4, 0.8)]


def test_first_reach_and_median():
    curve = [(8, 0.5), (16, 0.7), (24, 0.69), (32, 0.71)]
    assert first_reach(curve, 0.7) == 16 and first_reach(curve, 0.71) == 32 and first_reach(curve, 0.8) is None
    assert median([3.0, 1.0, 2.0]) == 2.0 and median([4.0, 1.0]) == 2.5


def test_time_to_target_is_paired_per_seed():
    joint = [[(8, 0.5), (16, 0.7), (24, 0.69)], [(8, 0.6), (16, 0.65), (24, 0.8)]]
    fast = [[(8, 0.72), (16, 0.7), (24, 0.7)], [(8, 0.5), (16, 0.81), (24, 0.8)]]
    slow = [[(8, 0.4), (16, 0.5), (24, 0.6)], [(8, 0.6), (16, 0.7), (24, 0.8)]]
    tt = time_to_target(fast, joint, seconds_per_step=2.0, joint_seconds_per_step=1.0)
    assert tt["target"] == [0.7, 0.8] and tt["steps"] == [8, 16] and tt["joint_steps"] == [16, 24]
    assert tt["paired_steps"] == [-8, -8] and tt["seconds"] == [16.0, 32.0] and tt["joint_seconds"] == [16.0, 24.0]
    assert tt["paired_seconds"] == [0.0, 8.0] and tt["speedup"] == [1.0, 0.75] and tt["reached"] == 2
    tt = time_to_target(slow, joint, 1.0, 1.0)
    assert tt["steps"] == [None, 24] and tt["reached"] == 1 and tt["paired_steps"] == [0]


def test_famo_run_logs_coefficients_and_resumes_exactly(env, tmp_path):
    """strategy famo through the CLI: metrics.jsonl holds its loss coefficients (no per-task gradient geometry),
    and a run cut at step 2 and resumed ends with the same adapter as an uninterrupted one (FAMO state saved)."""
    common = dict(strategy="famo", schedule="constant", warmup_ratio=0.0, plots=False, checkpoint_every=2)
    full = make_config(env, tmp_path / "full", steps=4, **common)
    assert cli(["train", str(full)]) == 0
    records = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert all(set(r["loss_coefficient"]) == {"sentiment", "topic"} and "grad_norm" not in r for r in steps)
    coeffs = torch.tensor([list(r["loss_coefficient"].values()) for r in steps])
    assert not torch.allclose(coeffs, torch.ones_like(coeffs)), "FAMO weights tasks unequally"
    assert (tmp_path / "full" / "conflicts.jsonl").read_text() == ""
    cut = make_config(env, tmp_path / "cut", steps=2, **common)
    assert cli(["train", str(cut)]) == 0
    assert cli(["train", str(cut), "--resume", "train.steps=4"]) == 0
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed famo run differs"


def test_compare_zero_shot_row(env, tmp_path):
    """zero_shot: the untrained causal LM evaluated once (step 0) and reused for every seed; paired against joint;
    refused for an encoder (its heads start untrained)."""
    from ortho_lora_dist.config import load_config
    from ortho_lora_dist.study.compare import compare

    cfg = load_config(make_config(env, tmp_path / "lm", kind="causal-lm", steps=2, plots=False))
    out = tmp_path / "lm-compare"
    s = compare(cfg, 2, out, ["zero_shot", "joint"])
    z = s["methods"]["zero_shot"]
    ev = json.loads((out / "runs" / "zero_shot" / "eval.json").read_text())
    assert ev["step"] == 0 and set(ev["test"]) >= {"sentiment", "topic"} and ev["loss"]["validation"]
    assert len(z["paired_vs_joint"]["per_seed"]) == 2 and "time_vs_joint" not in z
    assert z["average"]["mean"] == pytest.approx((ev["test"]["sentiment"] + ev["test"]["topic"]) / 2)
    assert "zero_shot" in (out / "compare.md").read_text()
    enc = load_config(make_config(env, tmp_path / "enc", steps=2, plots=False))
    with pytest.raises(ValueError, match="zero_shot needs model.kind: causal-lm"):
        compare(enc, 1, tmp_path / "enc-compare", ["zero_shot", "joint"])
