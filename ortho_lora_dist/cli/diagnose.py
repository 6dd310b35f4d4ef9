"""``ortho-lora diagnose``: a short joint run that separates each task's gradient signal from its noise."""

from __future__ import annotations

from ortho_lora_dist.cli.common import positive


def add_parser(sub) -> None:
    dg = sub.add_parser(
        "diagnose",
        help="a short joint run that separates each task's gradient signal from its noise: true conflicts, noise "
        "scales, and whether a rule has anything to act on (OUTPUT_DIR-diagnose/diagnose.json)",
    )
    dg.add_argument("config", help="the run's YAML (its tasks, data, model and batch: what the diagnose run reads)")
    dg.add_argument("overrides", nargs="*", help="key=value overrides, as for train")
    dg.add_argument("--steps", type=positive, default=30, help="steps of the window (default 30)")
    dg.set_defaults(func=handle)


def handle(args) -> int:
    from ortho_lora_dist.config import load_config
    from ortho_lora_dist.study.diagnose import diagnose

    report = diagnose(load_config(args.config, args.overrides), steps=args.steps)
    if "written" in report:
        print("\n".join(report["verdict"]))
        print(f"written: {report['written']}")
    return 0
