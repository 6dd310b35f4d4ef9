"""`ortho-lora merge` of a QLoRA run: the adapter folded into its base de-quantised to model.dtype, equal (fp32,
1e-4 relative to the largest logit, the tolerance the command itself checks) to the adapter on the NF4 base that
it was trained on; before, every quantized run was refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from ortho_lora_dist.cli import main as cli
from tests.app.test_app import make_config

pytestmark = pytest.mark.slow


def _wide_llama(env, path: Path) -> str:
    """The app's tiny Llama (its word tokenizer) made wider: bitsandbytes' CPU 4-bit inference kernel needs every
    quantized layer's output a multiple of 32 and its input at least 128 wide."""
    from transformers import AutoConfig, LlamaForCausalLM

    shutil.copytree(env["models"]["llama"], path)
    cfg = AutoConfig.from_pretrained(path)
    cfg.update({"hidden_size": 128, "intermediate_size": 256, "head_dim": 32, "vocab_size": 64})
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def test_merge_of_a_qlora_run_equals_the_adapter_on_its_nf4_base(env, tmp_path):  # noqa: F811
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = _wide_llama(env, tmp_path / "llama64")
    path = make_config(env, tmp_path / "run", kind="causal-lm", steps=3, plots=False, lr=2e-2)
    cfg = yaml.safe_load(path.read_text())
    cfg["model"].update(quantization="nf4", name_or_path=base)
    for t in cfg["tasks"]:
        t["max_eval_samples"] = 2
    path.write_text(yaml.safe_dump(cfg))
    assert cli(["train", str(path)]) == 0
    out = tmp_path / "merged"
    assert cli(["merge", str(tmp_path / "run"), str(out)]) == 0

    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert getattr(merged.config, "quantization_config", None) is None  # a plain model: vLLM / TGI load it
    q = BitsAndBytesConfig(  # QLoRA's: NF4 with double quantisation, as the run trained
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    nf4 = AutoModelForCausalLM.from_pretrained(base, quantization_config=q, dtype=torch.float32)
    ref = PeftModel.from_pretrained(nf4, str(tmp_path / "run" / "adapter")).eval()
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    ids = torch.tensor([[1, 5, 9, 14, 30, 7, 3, 11]])
    for m in ref.modules():  # the 4-bit layers as training runs them (CPU inference rounds the scales to bf16)
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        got, orig, want = merged(input_ids=ids).logits, plain(input_ids=ids).logits, ref(input_ids=ids).logits
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) / scale < 1e-4
    assert float((orig - want).abs().max()) / scale > 1e-3  # the de-quantised base, not the original weights

    facts = json.loads((out / "tasks.json").read_text())["merged_from"]
    assert facts["dequantized_from"] == "nf4" and facts["probe_max_logit_rel_diff"] < facts["tolerance"] == 1e-4
