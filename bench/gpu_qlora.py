"""QLoRA throughput and memory on a GPU: joint vs Ortho-LoRA (one backward) vs the paper's way (T backwards).

A Llama-2-7B-shaped model is initialised at random from its config directly on the GPU (no download),
its linear layers quantised to NF4 (bf16 compute), LoRA r=16 on all linear layers, T=3 tasks of one
sequence each per step (sequence 1024), reentrant gradient checkpointing as QLoRA users run it.
The three methods are timed interleaved; reported: tokens/s (median step) and peak GPU memory.

    python bench/gpu_qlora.py --out bench_gpu.json           # on a GPU machine (about 5 minutes on one H200)
    python bench/gpu_qlora.py --tiny --steps 2               # the same code path on CPU, tiny shapes
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def quantize_linears(model: torch.nn.Module, device: torch.device, compute=torch.bfloat16) -> None:
    """Swap every nn.Linear of the decoder layers for a bitsandbytes NF4 Linear4bit holding its weights."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and "layers." in f"{name}.{child_name}":
                q = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=False, compute_dtype=compute, quant_type="nf4"
                )
                q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False, quant_type="nf4")
                setattr(module, child_name, q.to(device))
                del child


def build(args, device):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.tiny:
        cfg = LlamaConfig(
            vocab_size=1000,
            hidden_size=128,
            intermediate_size=344,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=args.seq,
        )
    else:  # Llama-2-7B
        cfg = LlamaConfig(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
        )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    quantize_linears(model, device, dtype)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
    return get_peft_model(model, lora).to(device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="timed steps per method (after 2 warm-up steps)")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--tasks", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run of the same code path)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    from ortho_lora_dist import OrthoLoRA, task_mean

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        args.seq = min(args.seq, 128)
    T = args.tasks
    model = build(args, device)
    model.train()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (T, args.seq), generator=gen).to(device)
    tids = torch.arange(T, device=device)

    def losses():
        logits = model(input_ids=ids).logits[:, :-1]
        tok = F.cross_entropy(logits.float().reshape(-1, vocab), ids[:, 1:].reshape(-1), reduction="none")
        return task_mean(tok.view(T, -1), tids[:, None].expand(-1, args.seq - 1), T)

    lora_params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(lora_params, lr=1e-5)

    def joint():
        opt.zero_grad(set_to_none=True)
        losses().sum().backward()
        opt.step()

    def with_olr(mode):
        olr = OrthoLoRA(model, T, mode=mode)

        def step():
            olr.zero_grad()
            olr.set_tasks(tids)
            olr.backward(losses())
            olr.write_grads(olr.project())
            opt.step()

        return olr, step

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    results = {}
    order = ["joint", "ortho", "ortho_reference"]
    times = {m: [] for m in order}
    peaks = {}
    for rnd in range(args.steps + 2):
        for m in order:
            if m == "joint":
                fn, olr = joint, None
            else:  # capture is installed only while its own method runs
                olr, fn = with_olr("one_backward" if m == "ortho" else "reference")
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if rnd >= 2:
                times[m].append(time.perf_counter() - t0)
            if device.type == "cuda":
                peaks[m] = max(peaks.get(m, 0), torch.cuda.max_memory_allocated())
            if olr is not None and olr.capture is not None:
                olr.capture.remove()
            if olr is not None:
                olr.zero_grad()
    tokens = T * args.seq
    for m in order:
        med = statistics.median(times[m])
        results[m] = {"step_s": round(med, 4), "tokens_per_s": round(tokens / med, 1)}
        if m in peaks:
            results[m]["peak_GiB"] = round(peaks[m] / 2**30, 2)
    results["ortho/joint time"] = round(results["ortho"]["step_s"] / results["joint"]["step_s"], 3)
    results["reference/joint time"] = round(results["ortho_reference"]["step_s"] / results["joint"]["step_s"], 3)
    results["setup"] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "tasks": T,
        "seq": args.seq,
        "tiny": args.tiny,
        "lora_params": sum(p.numel() for p in lora_params),
        "torch": torch.__version__,
    }
    print(json.dumps(results, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
