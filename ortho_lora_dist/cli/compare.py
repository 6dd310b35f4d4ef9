"""``ortho-lora compare``: single-task vs joint vs multi-task rules over seeds, paired statistics (resumable)."""

from __future__ import annotations

import sys

from ortho_lora_dist.study.compare_defaults import DEFAULT_METHODS


def add_parser(sub) -> None:
    c = sub.add_parser(
        "compare", help="single-task vs joint vs multi-task rules over seeds, paired statistics (resumable)"
    )
    c.add_argument("config", help="the YAML config every method trains with (only the strategy changes)")
    c.add_argument("overrides", nargs="*", help="key.sub=value overrides, as for train")
    c.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per method (default 3), paired across methods")
    c.add_argument(
        "--methods",
        help="comma list: zero_shot (causal LM), single, joint, lossweights, ortho-factor, ortho-module, "
        "pcgrad-global, "
        "or STRATEGY[-factor|-module|-global] (e.g. upgrad-global, norm_balance-factor); default: "
        + ",".join(DEFAULT_METHODS),
    )
    c.add_argument(
        "--eval-every",
        type=int,
        help="validate every N optimizer steps: validation curves and time to joint's best validation average "
        "(default: the config's train.eval_every; 0: final evaluation only)",
    )
    c.add_argument(
        "--score",
        help="comma list of the tasks the average (and so the paired differences and time to target) is taken "
        "over; default all. The others are auxiliary: trained and tabled per task, not averaged",
    )
    c.add_argument("--out", help="default: OUTPUT_DIR-compare")
    c.set_defaults(func=handle)


def handle(args) -> int:
    from ortho_lora_dist.config import ConfigError, load_config
    from ortho_lora_dist.study.compare import compare

    cfg = load_config(args.config, args.overrides)
    if args.eval_every is not None and args.eval_every < 0:
        raise ConfigError(f"--eval-every must be 0 or more, got {args.eval_every}")
    out = args.out or str(cfg.output_dir) + "-compare"
    from ortho_lora_dist.study.compare import CompareInterrupted, UnknownTask

    try:
        methods = args.methods.split(",") if args.methods else None
        score = [n.strip() for n in args.score.split(",") if n.strip()] if args.score else None
        summary = compare(cfg, args.seeds, out, methods, eval_every=args.eval_every, score=score)
    except CompareInterrupted as e:
        print(str(e), file=sys.stderr)
        return 0
    except UnknownTask as e:
        raise ConfigError(f"--score: {e}") from None
    except ValueError as e:
        if "unknown method" in str(e):
            raise ConfigError(f"--methods: {e}") from None
        raise
    from ortho_lora_dist.study.compare import to_markdown

    print(to_markdown(summary))
    print(f"written: {out}/compare.json, compare.md, compare.png")
    return 0
