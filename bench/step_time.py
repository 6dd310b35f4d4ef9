"""Step time of joint vs Ortho-LoRA (one backward) vs Ortho-LoRA reference (T backward passes).

Llama-shaped model of a few million parameters, built from its config (no download), LoRA r=16 on all
linear layers, a mixed batch with ``--per-task`` samples of each task. "joint" is plain PEFT: no capture
installed, one backward of the summed loss, AdamW (the baseline of the ortho/joint ratio). The methods
are timed interleaved (round-robin, same inputs) so that machine noise hits them alike; ratios use
medians. ``--clock cpu`` times the process's CPU time instead of wall time (less sensitive to other
processes on a shared machine); ``--no-reference`` skips the slow T-backward reference.

    python bench/step_time.py --tasks 3 8 --steps 20

SmolLM2 mode (``--model DIR``, a causal-LM folder, e.g. the LLM demo's ``data/demo_llm/model``): the real
135M model instead of the tiny one, LoRA r=8 on all linear layers, the loss on the last ``--answer-tokens``
positions of every row (``logits_to_keep``: lm_head on those only, as training on answers does):

    python bench/step_time.py --model data/demo_llm/model --tasks 4 --per-task 2 --seq 64 --rank 8 --no-reference
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def build(args, seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if args.model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", init_lora_weights=False)
        return get_peft_model(model, lora)
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3 // 8 * 8,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=args.seq,
    )
    model = LlamaForCausalLM(cfg)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, lora)


ANSWER = 0  # main() sets it: the loss on the last ANSWER positions only (0: all)


def task_losses(model, ids, tids, T):
    from ortho_lora_dist import task_mean

    if ANSWER:  # lm_head on the last ANSWER + 1 positions; the last predicts nothing
        logits = model(input_ids=ids, logits_to_keep=ANSWER + 1).logits[:, :-1]
        target = ids[:, -ANSWER:]
    else:
        logits, target = model(input_ids=ids).logits[:, :-1], ids[:, 1:]
    tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    return task_mean(tok.view(ids.shape[0], -1), tids[:, None].expand(-1, target.shape[1]), T)


def make_steps(args, T, reference: bool = True):
    from ortho_lora_dist import OrthoLoRA

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (T * args.per_task, args.seq), generator=gen)
    tids = torch.arange(T).repeat_interleave(args.per_task)

    joint_model = build(args)
    joint_params = [p for p in joint_model.parameters() if p.requires_grad]
    joint_opt = torch.optim.AdamW(joint_params, lr=1e-4)

    def joint():
        joint_opt.zero_grad(set_to_none=True)
        task_losses(joint_model, ids, tids, T).sum().backward()
        joint_opt.step()

    def ortho_factory(mode):
        model = build(args)
        kw = {"buffer_dtype": args.buffer_dtype} if getattr(args, "buffer_dtype", "float32") != "float32" else {}
        olr = OrthoLoRA(model, T, mode=mode, **kw)
        opt = torch.optim.AdamW(olr.lora_params, lr=1e-4)

        def step():
            olr.zero_grad()
            olr.set_tasks(tids)
            olr.backward(task_losses(model, ids, tids, T))
            olr.write_grads(olr.project())
            opt.step()

        step.buffer_bytes = olr.grads.peak_bytes
        return step, sum(p.numel() for p in olr.lora_params)

    ortho, n_lora = ortho_factory("one_backward")
    steps = {"joint": joint, "ortho": ortho}
    if reference:
        steps["ortho_reference"] = ortho_factory("reference")[0]
    return steps, n_lora, sum(p.numel() for p in joint_model.parameters())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, nargs="+", default=[3, 8])
    p.add_argument("--steps", type=int, default=20, help="timed steps per method (after 3 warm-up steps)")
    p.add_argument("--per-task", type=int, default=2, help="samples of each task in the mixed batch")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--model", help="a causal-LM folder (e.g. data/demo_llm/model) instead of the tiny Llama")
    p.add_argument("--answer-tokens", type=int, help="loss on the last N positions (default: all; --model: 16)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="wall time, or this process's CPU time")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--no-reference", action="store_true", help="time joint and ortho only")
    p.add_argument("--buffer-dtype", choices=["float32", "bfloat16"], default="float32", help="ortho's per-task buffer")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    global ANSWER
    ANSWER = args.answer_tokens if args.answer_tokens is not None else (16 if args.model else 0)
    if args.model:
        from transformers import AutoConfig

        args.vocab = AutoConfig.from_pretrained(args.model).vocab_size
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    report = []
    for T in args.tasks:
        steps, n_lora, n_total = make_steps(args, T, reference=not args.no_reference)
        times = {k: [] for k in steps}
        for _ in range(3):
            for fn in steps.values():
                fn()
        for _ in range(args.steps):
            for name, fn in steps.items():
                t0 = clock()
                fn()
                times[name].append(clock() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {
            "model": args.model or "tiny-llama",
            "answer_tokens": ANSWER,
            "tasks": T,
            "model_params": n_total,
            "lora_params": n_lora,
            "batch": T * args.per_task,
            "seq": args.seq,
            "clock": args.clock,
            "threads": torch.get_num_threads(),
            "buffer_dtype": args.buffer_dtype,
            "ortho_buffer_MB": round(steps["ortho"].buffer_bytes / 2**20, 3),
            **{f"{k}_s": round(v, 4) for k, v in med.items()},
            "ortho/joint": round(med["ortho"] / med["joint"], 3),
            "ortho/joint_min": round(min(times["ortho"]) / min(times["joint"]), 3),  # fastest steps: least noise
        }
        if "ortho_reference" in med:
            row["reference/joint"] = round(med["ortho_reference"] / med["joint"], 3)
        report.append(row)
        print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
