"""``ortho-lora init``: a starter project in a folder, from the files that ship with the package.

Writes ``<template>.yaml`` (one of configs/*.yaml), the DeepSpeed config it names (relative paths in a
config resolve against the config's folder, so ``ds_configs/zero2.json`` lands beside it) and the SLURM
scripts (slurm/*.sbatch + slurm/common.sh, submitted from that folder). Nothing is overwritten without
``force`` (a file already there with the same content is left alone); a refusal writes nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from ortho_lora_dist.runtime.resources import packaged_file, template_dir, templates


def _targets(template: str, dest: Path) -> list[tuple[Path, Path]]:
    found = templates()
    if template not in found:
        raise FileNotFoundError(f"--template {template!r}: no such template; choose from {', '.join(found)}")
    source = found[template]
    pairs = [(source, dest / source.name)]
    tree = yaml.safe_load(source.read_text()) or {}
    ds = ((tree.get("distributed") or {}).get("deepspeed_config")) or "ds_configs/zero2.json"
    shipped = None if Path(ds).is_absolute() else packaged_file(ds)
    if shipped is not None:
        pairs.append((shipped, dest / ds))
    slurm = template_dir("slurm")
    for script in sorted(slurm.glob("*.sbatch")) + [slurm / "common.sh"]:
        pairs.append((script, dest / "slurm" / script.name))
    return pairs


def init_project(template: str = "demo", directory: str | Path = ".", force: bool = False) -> list[Path]:
    """Copy the template's files into ``directory``; the paths written (FileExistsError lists clashes unless
    ``force``)."""
    dest = Path(directory)
    pairs = _targets(template, dest)
    same = {target for source, target in pairs if target.is_file() and target.read_bytes() == source.read_bytes()}
    pairs = [(source, target) for source, target in pairs if target not in same]  # already there, unchanged
    clash = [str(target) for _, target in pairs if target.exists()]
    if clash and not force:
        raise FileExistsError(
            f"ortho-lora init would overwrite {', '.join(clash)}: pass --force to replace them (nothing was written)"
        )
    written = []
    for source, target in pairs:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        if target.suffix in (".sbatch", ".sh"):
            target.chmod(0o755)
        written.append(target)
    return written
