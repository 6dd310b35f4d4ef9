"""Atomic replacement of files and folders: readers see the old version or the new one, never half of one."""

from __future__ import annotations

import shutil
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a hidden sibling, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def replace_dir(staged: Path, target: Path) -> None:
    """Move the complete folder ``staged`` to ``target``, replacing an existing ``target`` (moved aside first)."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.replace(old)
    staged.replace(target)
    shutil.rmtree(old, ignore_errors=True)
