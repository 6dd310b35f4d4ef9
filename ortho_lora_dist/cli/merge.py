"""``ortho-lora merge``: the adapter folded into its (non-quantized) base model."""

from __future__ import annotations


def add_parser(sub) -> None:
    mg = sub.add_parser(
        "merge", help="fold the adapter into its (non-quantized) base: a model plain transformers loads"
    )
    mg.add_argument("run_dir", metavar="RUN_DIR", help="a run's output dir or its adapter/ directory")
    mg.add_argument("out_dir", metavar="OUT_DIR", help="where to write the merged model (a new folder)")
    mg.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    mg.add_argument("--base", help="the base model, when it is no longer where the adapter says")
    mg.set_defaults(func=handle)


def handle(args) -> int:
    from ortho_lora_dist.artifacts.merge import merge

    print(f"written: {merge(args.run_dir, args.out_dir, force=args.force, base=args.base)}")
    return 0
