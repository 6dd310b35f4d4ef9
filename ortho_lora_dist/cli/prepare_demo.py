"""``ortho-lora prepare-demo``: the demo's real tasks as JSONL from PyPI-shipped corpora (``--llm``: the LLM demo)."""

from __future__ import annotations

from ortho_lora_dist.cli.common import positive


def add_parser(sub) -> None:
    d = sub.add_parser(
        "prepare-demo",
        help="write the demo's real tasks as JSONL from PyPI-shipped corpora (--llm: SmolLM2 + reasoning-gym tasks)",
    )
    d.add_argument(
        "--llm",
        action="store_true",
        help="the LLM demo: SmolLM2-135M-Instruct converted once into OUT/model, five reasoning-gym chat tasks",
    )
    d.add_argument(
        "--out",
        default=None,
        help="folder for TASK/{train,validation,test}.jsonl (default data/demo; with --llm data/demo_llm)",
    )
    d.add_argument("--train", type=positive, default=None, help="training examples per task (default 512; --llm 256)")
    d.add_argument(
        "--validation", type=positive, default=None, help="validation examples per task (default 200; --llm 32)"
    )
    d.add_argument("--test", type=positive, default=None, help="test examples per task (default 400; --llm 64)")
    d.add_argument(
        "--seed", type=int, default=0, help="seed of the sampling and of the split (default 0; --llm: fixed seeds)"
    )
    d.set_defaults(func=handle)


def handle(args) -> int:
    sizes = {k: getattr(args, k) for k in ("train", "validation", "test") if getattr(args, k) is not None}
    if args.llm:
        from ortho_lora_dist.data.demo_llm import prepare_llm_demo

        summary = prepare_llm_demo(args.out or "data/demo_llm", **sizes)
    else:
        from ortho_lora_dist.data.demo import prepare_demo

        summary = prepare_demo(args.out or "data/demo", seed=args.seed, **sizes)
    width = max(map(len, summary))
    for task, counts in summary.items():
        print(f"{task:{width}s} " + "  ".join(f"{k}={v}" for k, v in counts.items()))
    return 0
