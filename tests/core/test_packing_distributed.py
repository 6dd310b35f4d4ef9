"""train.packing on 2 ranks (gloo, CPU): DDP, DeepSpeed ZeRO-2 and FSDP2 with packed rows end with the same adapter
as DDP with padded rows (1e-5 relative, fp32, no dropout), the same per-task losses (1e-5); the reference is 2-rank
DDP because a task's loss is the mean over ranks of each rank's token mean (docs/design.md), and the padded runs of
the three engines equal each other and one process elsewhere (test_distributed.py, test_engine_resume.py)."""

from __future__ import annotations

import json

import pytest
import yaml
from safetensors.torch import load_file

from tests.app.test_app import make_config
from tests.app.test_packing import losses, rel
from tests.core.test_engine_resume import torchrun

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    return run(env, tmp_path_factory.mktemp("packing-dist"), "ddp", False)


def run(env, root, engine: str, packing: bool):
    out = root / f"{engine}-{'packed' if packing else 'padded'}"
    path = make_config(env, out, kind="causal-lm", steps=2, plots=False, packing=packing, strategy="ortho")
    cfg = yaml.safe_load(path.read_text())
    cfg["distributed"] = {"engine": engine}
    cfg["lora"]["dropout"] = 0.0
    cfg["model"]["max_length"] = 40
    cfg["tasks"][0]["max_eval_samples"] = cfg["tasks"][1]["max_eval_samples"] = 4
    path.write_text(yaml.safe_dump(cfg))
    torchrun(["train", str(path)], root / f"{out.name}.log")
    return out


@pytest.mark.parametrize("engine", ["ddp", "deepspeed", "fsdp"])
def test_packed_on_two_ranks_equals_padded(env, tmp_path, reference, engine):
    out = run(env, tmp_path, engine, True)
    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    assert rel(a, b) < 1e-5, f"{engine}: {rel(a, b):.2e}"
    for p, u in zip(losses(out), losses(reference), strict=True):
        assert all(abs(p[k] - u[k]) < 1e-5 for k in u), (p, u)
    ev_p, ev_u = (json.loads((d / "eval.json").read_text()) for d in (out, reference))
    assert ev_p["test"] == ev_u["test"]
