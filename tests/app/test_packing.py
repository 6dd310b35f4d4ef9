"""train.packing through the CLI on the tiny causal LM: the same samples packed or padded end with the same
adapter (1e-5 relative, fp32, no dropout: dropout masks are drawn over other shapes), the same per-task losses in
metrics.jsonl (1e-5), across task-sampling modes and gradient accumulation; resume of a packed run is bitwise;
what packing cannot do is refused before anything loads."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ortho_lora_dist.cli import main as cli
from ortho_lora_dist.config import Config
from ortho_lora_dist.data.loading import load_tasks
from ortho_lora_dist.models.build import load_run_model
from tests.app.test_app import make_config


def rel(a: dict, b: dict) -> float:
    num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in b) ** 0.5
    return num / sum(float((b[k] ** 2).sum()) for k in b) ** 0.5


def config(env, out, packing: bool, **train):
    path = make_config(env, out, kind="causal-lm", plots=False, packing=packing, **train)
    cfg = yaml.safe_load(path.read_text())
    cfg["lora"]["dropout"] = 0.0
    cfg["model"]["max_length"] = 40  # rows of up to 40 tokens: three or four samples each
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(run) -> list[dict]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize(
    "train",
    [
        dict(strategy="ortho", steps=2),
        dict(strategy="imtl_g", granularity="global", steps=2, gradient_accumulation=2),
        dict(strategy="norm_balance", task_sampling="proportional", steps=2),
        dict(strategy="famo", steps=2),
    ],
    ids=["ortho", "imtl_g-accum2", "norm_balance-proportional", "famo"],
)
def test_packed_run_equals_padded_run(env, tmp_path, train):
    runs = {}
    for packing in (True, False):
        out = tmp_path / f"packed{packing}"
        assert cli(["train", str(config(env, out, packing, **train))]) == 0
        runs[packing] = out
    a = load_file(str(runs[True] / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(runs[False] / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any(bool(v.abs().sum() > 0) for k, v in b.items() if "lora_B" in k)
    assert rel(a, b) < 1e-5, rel(a, b)
    for p, u in zip(losses(runs[True]), losses(runs[False]), strict=True):
        assert p.keys() == u.keys()
        assert all(abs(p[k] - u[k]) < 1e-5 for k in p), (p, u)
    assert (
        json.loads((runs[True] / "eval.json").read_text())["test"]
        == json.loads((runs[False] / "eval.json").read_text())["test"]
    )


def test_packed_batches_share_rows(env, tmp_path):
    """The packed micro-batch really holds several samples per row, of both tasks."""
    cfg = Config.model_validate(yaml.safe_load(config(env, tmp_path / "r", True).read_text()))
    tasks = load_tasks(cfg.tasks)
    model = load_run_model(cfg, tasks, torch.device("cpu"), 1)
    records = [tasks[t].splits["train"][i] for t in (0, 1) for i in range(4)]
    tids = [0] * 4 + [1] * 4
    packed, padded = model.collate_packed(records, tids), model.collate(records, tids)
    assert packed["input_ids"].shape[0] < len(records)
    both = [len(set(row.tolist()) - {-1}) for row in packed["token_task_ids"]]
    assert max(both) == 2, "some row mixes the two tasks"
    torch.testing.assert_close(model.task_losses(packed), model.task_losses(padded), rtol=0, atol=1e-6)


def test_packed_resume_is_bitwise(env, tmp_path):
    common = dict(strategy="ortho", schedule="constant", checkpoint_every=2)
    full = config(env, tmp_path / "full", True, steps=4, **common)
    assert cli(["train", str(full)]) == 0
    cut = config(env, tmp_path / "cut", True, steps=2, **common)
    assert cli(["train", str(cut)]) == 0
    assert cli(["train", str(cut), "--resume", "train.steps=4"]) == 0
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed packed run differs"


def test_packing_refusals(env, tmp_path, capsys):
    enc = make_config(env, tmp_path / "enc", packing=True)
    assert cli(["train", str(enc)]) == 2
    assert "train.packing" in capsys.readouterr().err
    cfg = yaml.safe_load(config(env, tmp_path / "x", True).read_text())
    cfg["model"]["attn_implementation"] = "flex_attention"
    bad = tmp_path / "flex.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    assert cli(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "model.attn_implementation" in err and "flex_attention" in err
