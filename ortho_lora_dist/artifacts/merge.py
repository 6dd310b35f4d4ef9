"""``ortho-lora merge``: base + LoRA folded into one model that plain transformers loads.

OUT_DIR: the merged model (``save_pretrained``) and its tokenizer; for encoders also ``heads.safetensors``
(the task heads are not part of the base model); ``tasks.json`` (the adapter's, with ``merged_from``).
Written to a staging folder and renamed: never half a model.

A QLoRA run (causal LM on a 4-bit / 8-bit base) is merged into its base DE-QUANTISED to ``model.dtype`` (bf16 for
the 7B template: what vLLM / TGI serve): the weights the adapter was trained against, exactly, not the original
full-precision checkpoint (which differs by the quantisation error). Before anything is written, the merged model's
logits on a probe text are compared with the adapter on the quantized base; beyond the tolerance of the dtype
(MERGE_TOLERANCE, relative to the largest logit) nothing is written. Quantized encoders are refused.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ortho_lora_dist.artifacts.adapter import AdapterError, find_adapter, load_adapter_model, read_meta, spec_from_meta
from ortho_lora_dist.models.loading import DTYPES
from ortho_lora_dist.runtime import jsonio
from ortho_lora_dist.runtime.fsutil import replace_dir
from ortho_lora_dist.runtime.hub import resolve_model_path

BITS = {"nf4": "4-bit (nf4)", "int8": "8-bit (int8)"}
MERGE_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}  # max |logit diff| / max |logit|
PROBE = "The merged model must answer as the adapter on its base does. 1 + 2 = 3; the quick brown fox."


def _check_out_dir(out: Path, adapter_dir: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"OUT_DIR {out} is a file: choose a folder")
    resolved, adapter = out.resolve(), adapter_dir.resolve()
    if resolved == adapter or resolved in adapter.parents or adapter in resolved.parents:
        raise FileExistsError(
            f"OUT_DIR {out} would overwrite or nest in the adapter {adapter_dir}: choose another folder"
        )
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise FileExistsError(
                f"OUT_DIR {out} exists and is not empty: pass --force to replace it, or choose another folder"
            )
        if any((out / name).exists() for name in ("metrics.jsonl", "finished.json", "checkpoints")):
            raise FileExistsError(
                f"OUT_DIR {out} holds a training run: --force never replaces one; choose another folder"
            )


def _with_base_extras(merged, cfg):
    """Encoders are trained without their pooler (the heads pool the hidden states themselves): put the base's
    back, so that AutoModel.from_pretrained(OUT_DIR) finds every weight instead of initialising some at random."""
    from transformers import AutoModel

    full = AutoModel.from_pretrained(
        resolve_model_path(cfg.model.name_or_path),
        dtype=DTYPES[cfg.model.dtype],
        trust_remote_code=cfg.model.trust_remote_code,
    )
    missing, unexpected = full.load_state_dict(merged.state_dict(), strict=False)
    if unexpected or not missing:  # nothing to add, or not the same architecture: keep the merged model as it is
        return merged
    return full


def _merge_dequantized(adapter_dir: Path, cfg, model, tokenizer) -> tuple:
    """(merged model, facts for tasks.json): the quantized base de-quantised to model.dtype, the adapter folded in,
    checked against ``model`` (the adapter on the quantized base) on PROBE."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ortho_lora_dist.models.loading import from_pretrained, placement, quantization

    ids = tokenizer(PROBE, return_tensors="pt")["input_ids"]
    for m in model.modules():  # bitsandbytes' CPU inference kernel rounds the block scales to bf16 (1e-3 relative);
        if hasattr(m, "support_avx512bf16_for_cpu"):  # the path training runs de-quantises exactly as dequantize()
            m.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        ref = model.peft_model(input_ids=ids.to(model.device)).logits.float().cpu()
    del model
    dtype = DTYPES[cfg.model.dtype]
    base = from_pretrained(
        AutoModelForCausalLM.from_pretrained,
        resolve_model_path(cfg.model.name_or_path),
        cfg.model.name_or_path,
        dtype=dtype,
        quantization_config=quantization(cfg.model, None),
        trust_remote_code=cfg.model.trust_remote_code,
        **placement(cfg.model),
    ).dequantize(dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().eval()
    with torch.no_grad():
        got = merged(input_ids=ids.to(merged.device)).logits.float().cpu()
    diff = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    tol = MERGE_TOLERANCE[cfg.model.dtype]
    if not diff <= tol:
        raise AdapterError(
            f"{adapter_dir}: the merged model's logits differ from the adapter on its {BITS[cfg.model.quantization]} "
            f"base by {diff:.2e} (relative to the largest logit; tolerance {tol:g} in {cfg.model.dtype}): nothing "
            "written; serve the adapter unmerged on the quantized base instead"
        )
    return merged, {"dequantized_from": cfg.model.quantization, "probe_max_logit_rel_diff": diff, "tolerance": tol}


def merge(run_dir: str | Path, out_dir: str | Path, force: bool = False, base: str | None = None) -> Path:
    adapter_dir = find_adapter(run_dir)
    meta = read_meta(adapter_dir)
    quant = meta["model"].get("quantization", "none")
    if quant != "none" and meta["model"]["kind"] != "causal-lm":
        raise AdapterError(
            f"{adapter_dir} is an encoder trained on a {BITS.get(quant, quant)} base: merging into a quantized "
            "encoder is not supported; use the adapter as it is (`ortho-lora predict`, or PeftModel.from_pretrained "
            "on the quantized base)"
        )
    out = Path(out_dir)
    _check_out_dir(out, adapter_dir, force)
    cfg, _ = spec_from_meta(meta, base)
    model, _, tokenizer = load_adapter_model(adapter_dir, base)
    facts: dict = {}
    if quant != "none":
        merged, facts = _merge_dequantized(adapter_dir, cfg, model, tokenizer)
    else:
        merged = model.peft_model.merge_and_unload()
    if meta["model"]["kind"] == "encoder-classification":
        merged = _with_base_extras(merged, cfg)
    stage = out.with_name(f".{out.name}.merging")
    shutil.rmtree(stage, ignore_errors=True)
    try:
        merged.save_pretrained(str(stage))
        tokenizer.save_pretrained(str(stage))
        if (adapter_dir / "heads.safetensors").is_file():
            shutil.copy2(adapter_dir / "heads.safetensors", stage / "heads.safetensors")
        origin = {"adapter": str(adapter_dir), "base_model": cfg.model.name_or_path, **facts}
        described = {**meta, "merged_from": origin}
        (stage / "tasks.json").write_text(jsonio.dumps(described, indent=1))
        replace_dir(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out
