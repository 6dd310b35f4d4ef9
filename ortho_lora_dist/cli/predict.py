"""``ortho-lora predict``: JSONL records through a saved adapter alone (no config, no data)."""

from __future__ import annotations


def add_parser(sub) -> None:
    pr = sub.add_parser("predict", help="predict JSONL records with a saved adapter alone (no config, no data)")
    pr.add_argument("adapter", metavar="RUN_DIR", help="a run's output dir or its adapter/ directory")
    pr.add_argument("--input", required=True, help='JSONL, one {"task": NAME, "text": ..., "text_pair"?: ...} per line')
    pr.add_argument("--output", required=True, help='JSONL, one {"task", "prediction"} per input line, same order')
    pr.add_argument("--batch-size", type=int, default=32, help="records per forward pass (default 32)")
    pr.add_argument(
        "--base", help="the base model, when it is no longer where the adapter says (default: its tasks.json)"
    )
    pr.set_defaults(func=handle)


def handle(args) -> int:
    from ortho_lora_dist.artifacts.predict import predict_file

    n = predict_file(args.adapter, args.input, args.output, args.batch_size, args.base)
    print(f"written: {args.output} ({n} predictions)")
    return 0
