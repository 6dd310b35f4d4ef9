import json

import pytest

from ortho_lora_dist.engines.deepspeed_config import load_ds_config


def test_shipped_configs_fill_auto_values():
    for name in ("zero2", "zero2_offload"):
        cfg = load_ds_config(f"ds_configs/{name}.json", micro_batch=6, world_size=4, grad_clip=1.0, bf16=True)
        assert cfg["train_micro_batch_size_per_gpu"] == 6
        assert cfg["gradient_accumulation_steps"] == 1
        assert cfg["train_batch_size"] == 24
        assert cfg["gradient_clipping"] == 1.0  # explicit: DeepSpeed would silently clip to 1.0 otherwise
        assert cfg["bf16"]["enabled"] is True
        assert "auto" not in json.dumps(cfg)


def test_zero3_is_refused(tmp_path):
    p = tmp_path / "z3.json"
    p.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ValueError, match="stage=3 is not supported"):
        load_ds_config(p, micro_batch=1, world_size=1, grad_clip=0.0)


def test_accumulation_in_deepspeed_is_refused(tmp_path):
    p = tmp_path / "gas.json"
    p.write_text(json.dumps({"gradient_accumulation_steps": 4, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4"):
        load_ds_config(p, micro_batch=1, world_size=1, grad_clip=0.0)


def test_bad_json_names_file_and_line(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{\n  "zero_optimization": {"stage": 2},\n  oops\n}')
    with pytest.raises(ValueError, match=r"bad.json, line 3"):
        load_ds_config(p, micro_batch=1, world_size=1, grad_clip=0.0)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_ds_config(tmp_path / "missing.json", micro_batch=1, world_size=1, grad_clip=0.0)
