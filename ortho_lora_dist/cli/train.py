"""``ortho-lora train``: one shared LoRA adapter trained on several tasks."""

from __future__ import annotations


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="train one shared LoRA adapter on several tasks")
    t.add_argument("config", help="YAML config (see configs/)")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.lr=1e-4 tasks.0.loss_weight=2")
    t.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in output_dir")
    t.set_defaults(func=handle)


def handle(args) -> int:
    from ortho_lora_dist.runtime.signals import raise_on_stop

    raise_on_stop()  # SIGTERM / SIGUSR1 before the loop: exit 0 with nothing written
    from ortho_lora_dist.config import load_config
    from ortho_lora_dist.runtime.distributed import leave_process_group
    from ortho_lora_dist.training.recipe import Trainer

    cfg = load_config(args.config, args.overrides)
    result = Trainer(cfg, resume=args.resume).train()
    leave_process_group()
    return 0 if result is not None else 1  # a stop signal (checkpoint written) is a clean exit: 0
