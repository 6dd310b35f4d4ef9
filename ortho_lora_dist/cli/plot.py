"""``ortho-lora plot``: a run's loss per task and conflict heat map (PNG)."""

from __future__ import annotations


def add_parser(sub) -> None:
    pl = sub.add_parser("plot", help="loss per task and conflict heat map (PNG) of a run")
    pl.add_argument("output_dir", help="a run's output_dir (reads its metrics.jsonl, writes the PNGs there)")
    pl.set_defaults(func=handle)


def handle(args) -> int:
    from ortho_lora_dist.artifacts.plots import plot_run

    for path in plot_run(args.output_dir):
        print(path)
    return 0
