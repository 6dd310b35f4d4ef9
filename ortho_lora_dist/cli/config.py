"""``ortho-lora config``: the configuration reference (every key, its type, default and meaning) as Markdown."""

from __future__ import annotations


def add_parser(sub) -> None:
    cf = sub.add_parser("config", help="print the configuration reference: every key, its type, default and meaning")
    cf.set_defaults(func=handle)


def handle(args) -> int:
    from ortho_lora_dist.config.reference import reference_markdown

    print(reference_markdown(), end="")
    return 0
