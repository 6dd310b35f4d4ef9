"""Files that ship with the package: DeepSpeed configs, example configs, SLURM scripts (``ortho-lora init``).

The repository keeps them at its top (ds_configs/, configs/, slurm/); the wheel maps them under
ortho_lora_dist/templates/ (pyproject.toml). Both places are looked up, the wheel's first, so an installed
package and a clone (editable or PYTHONPATH) behave the same. The same holds for the launcher package:
launcher/ in the repository, ortho_lora_dist.launcher once installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

KINDS = ("ds_configs", "configs", "slurm")
_HERE = Path(__file__).resolve().parent.parent  # the ortho_lora_dist package folder


def template_dir(kind: str) -> Path:
    """The folder holding the shipped ``kind`` files (ds_configs, configs or slurm)."""
    if kind not in KINDS:
        raise ValueError(f"unknown template kind {kind!r}; one of {KINDS}")
    for candidate in (_HERE / "templates" / kind, _HERE.parent / kind):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"the packaged {kind}/ folder is missing from this installation of ortho-lora-dist "
        f"(looked in {_HERE / 'templates' / kind} and {_HERE.parent / kind}); reinstall the package"
    )


def packaged_file(relative: str | Path) -> Path | None:
    """``ds_configs/zero2.json`` -> the shipped copy of it, or None when the package has no such file."""
    parts = Path(relative).parts
    if len(parts) < 2 or parts[0] not in KINDS or ".." in parts:
        return None
    try:
        path = template_dir(parts[0]).joinpath(*parts[1:])
    except FileNotFoundError:
        return None
    return path if path.is_file() else None


def templates() -> dict[str, Path]:
    """Starter configs by name (``demo`` -> .../configs/demo.yaml)."""
    return {p.stem: p for p in sorted(template_dir("configs").glob("*.yaml"))}


def launcher_module(name: str) -> ModuleType:
    """``ortho_lora_dist.launcher.<name>``; from a source tree that is not installed, the repository's launcher/."""
    full = "ortho_lora_dist.launcher"
    if full not in sys.modules and importlib.util.find_spec(full) is None:
        init = _HERE.parent / "launcher" / "__init__.py"
        if not init.is_file():
            raise ModuleNotFoundError(f"{full} is missing: reinstall ortho-lora-dist (pip install -e . in a clone)")
        spec = importlib.util.spec_from_file_location(full, init, submodule_search_locations=[str(init.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[full]
            raise
    return importlib.import_module(f"{full}.{name}")
