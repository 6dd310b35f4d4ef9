"""``ortho-lora eval``: a trained adapter on the config's validation/test splits."""

from __future__ import annotations


def add_parser(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a trained adapter on the config's validation/test splits")
    e.add_argument("config", help="the YAML config the run was trained with (see configs/)")
    e.add_argument("overrides", nargs="*", help="key.sub=value overrides, as for train")
    e.add_argument("--adapter", required=True, help="the run's output dir or its adapter/ directory")
    e.add_argument(
        "--output",
        help="where to write the results (default: RUN_DIR/eval-cli.json; the run's own files are never touched)",
    )
    e.set_defaults(func=handle)


def handle(args) -> int:
    from pathlib import Path

    from ortho_lora_dist.artifacts.adapter import find_adapter
    from ortho_lora_dist.config import eval_batch_size, load_config
    from ortho_lora_dist.evaluation.evaluate import run_final_eval
    from ortho_lora_dist.evaluation.loader import load_for_eval
    from ortho_lora_dist.evaluation.report import eval_document, print_table
    from ortho_lora_dist.runtime import jsonio
    from ortho_lora_dist.runtime import run_files as rf
    from ortho_lora_dist.runtime.fsutil import atomic_write_text

    cfg = load_config(args.config, args.overrides)
    adapter = find_adapter(args.adapter)
    ev = load_for_eval(cfg, adapter)  # reads the run; writes nothing but its own output file
    full = run_final_eval(ev.model, ev.tasks, ev.info, eval_batch_size(cfg))
    if ev.info.main:
        out = Path(args.output) if args.output else adapter.parent / "eval-cli.json"
        if out.resolve() in {(adapter.parent / n).resolve() for n in rf.RUN_FILES}:
            raise FileExistsError(f"--output {out} is one of the training run's own files: choose another path")
        atomic_write_text(out, jsonio.dumps(eval_document({"adapter": str(adapter)}, full), indent=1))
        print_table(full, ev.tasks)
        print(f"written: {out}")
    return 0
