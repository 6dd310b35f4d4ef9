"""A strategy's options: the keyword-only parameters of its builder, and the check of what a config gives."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any


def keyword_options(builder: Callable[..., Any]) -> dict[str, Any]:
    """{name: default} of the keyword-only parameters of ``builder``."""
    params = inspect.signature(builder).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def checked_options(strategy: str, options: Mapping[str, Any] | None, valid: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` as a dict; ValueError naming the first key that ``valid`` does not list."""
    options = dict(options or {})
    for key in options:
        if key not in valid:
            listed = ", ".join(sorted(valid)) or "none"
            raise ValueError(f"strategy {strategy!r} has no option {key!r}; valid options: {listed}")
    return options
