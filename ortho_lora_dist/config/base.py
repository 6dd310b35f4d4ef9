"""The base of every config section: unknown keys, inf and nan are refused; a docstring under a field is its
description (the generated reference, docs/reference/config.md)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(
        extra="forbid", protected_namespaces=(), allow_inf_nan=False, use_attribute_docstrings=True
    )  # inf / nan: refused
