"""Strict JSON for every file we write: non-finite numbers become null (never the bare NaN / Infinity that strict
parsers reject). ``dumps`` is the only JSON encoder the package uses (tests/app/test_strict_json.py checks it)."""

from __future__ import annotations

import json
import math
from typing import Any


def finite(obj: Any) -> Any:
    """``obj`` with every float that is NaN or infinite replaced by None (dicts, lists and tuples walked)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """json.dumps of ``finite(obj)`` with allow_nan=False (a non-finite number that slipped through raises)."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)
