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


# what torch's zip writer says when a write fails (a full disk ends in "unexpected pos" or "file write failed")
_TORCH_WRITER = ("PytorchStreamWriter", "inline_container", "unexpected pos", "file write failed")


def is_write_failure(e: BaseException) -> bool:
    """Whether ``e`` is the machine refusing a write (full disk, permissions, I/O), as each writer reports it:
    OSError (Python's files); safetensors' SafetensorError ("I/O error: No space left on device"); torch.save's
    RuntimeError from its zip writer. Anything else is a bug, not a write failure."""
    if isinstance(e, OSError):
        return True
    text = str(e)
    if type(e).__name__ == "SafetensorError":
        return "I/O error" in text or "os error" in text
    return isinstance(e, RuntimeError) and any(s in text for s in _TORCH_WRITER)
