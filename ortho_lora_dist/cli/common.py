"""What more than one sub-command's arguments share."""

from __future__ import annotations

import argparse


def positive(text: str) -> int:
    """argparse type: a whole number above 0 (the usage error names the text given)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return value
