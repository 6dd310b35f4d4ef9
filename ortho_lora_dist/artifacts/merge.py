"""``ortho-lora merge``: base + LoRA folded into one model that plain transformers loads.

OUT_DIR: the merged model (``save_pretrained``) and its tokenizer; for encoders also ``heads.safetensors``
(the task heads are not part of the base model); ``tasks.json`` (the adapter's, with ``merged_from``).
Quantized (4-bit / 8-bit) bases are refused: folding LoRA into them re-rounds every weight, so the result
would no longer equal base + adapter. Written to a staging folder and renamed: never half a model.
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


def merge(run_dir: str | Path, out_dir: str | Path, force: bool = False, base: str | None = None) -> Path:
    adapter_dir = find_adapter(run_dir)
    meta = read_meta(adapter_dir)
    quant = meta["model"].get("quantization", "none")
    if quant != "none":
        raise AdapterError(
            f"{adapter_dir} was trained on a {BITS.get(quant, quant)} base: merging LoRA into quantized weights "
            "re-rounds them, so the merged model would not equal base + adapter; use the adapter as it is "
            "(`ortho-lora predict`, or PeftModel.from_pretrained on the quantized base)"
        )
    out = Path(out_dir)
    _check_out_dir(out, adapter_dir, force)
    cfg, _ = spec_from_meta(meta, base)
    model, _, tokenizer = load_adapter_model(adapter_dir, base)
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
        described = {**meta, "merged_from": {"adapter": str(adapter_dir), "base_model": cfg.model.name_or_path}}
        (stage / "tasks.json").write_text(jsonio.dumps(described, indent=1))
        replace_dir(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out
