"""Checkpoints: ``checkpoints/step-N/`` written atomically (temp dir + rename), resumed from the newest
one whose files all match the SHA-256 checksums recorded in its manifest.

  adapter/               PEFT adapter (PeftModel.from_pretrained loads it) + heads.safetensors (keyed by task name)
  optimizer.pt           optimizer + scheduler (+ strategy) state (torch engines; DeepSpeed writes deepspeed/)
  rng{rank}.safetensors  torch RNG state and the task-order generator state of each rank
  trainer_state.json     written last: step, sampler positions, skip counters, config, world size and
                         ``files`` = {relative path: sha256} of every other file of the checkpoint

Loading: tensors from safetensors, JSON, and optimizer.pt with ``torch.load(weights_only=True)``. DeepSpeed's
own loader unpickles (``torch.load(weights_only=False)``): its files are only handed to it after their
checksums matched the manifest, i.e. only files this run's checkpointing wrote are ever unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ortho_lora_dist.artifacts.adapter import load_adapter_weights
from ortho_lora_dist.runtime import jsonio
from ortho_lora_dist.runtime import run_files as rf
from ortho_lora_dist.runtime.distributed import DistInfo, all_ok, broadcast_object
from ortho_lora_dist.runtime.fsutil import is_write_failure, replace_dir

STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"  # the replicated engine state (Engine.state_dict) and OrthoLoRA's
log = logging.getLogger("ortho_lora_dist")


class CheckpointError(RuntimeError):
    """No usable checkpoint: names the file that failed verification."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions); the previous ones are intact."""


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (trainer_state.json present), oldest first."""
    root = Path(output_dir) / rf.CHECKPOINTS
    found = (
        [p for p in root.glob("step-*") if re.fullmatch(r"step-\d+", p.name) and (p / STATE).is_file()]
        if root.is_dir()
        else []
    )
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = checkpoint_dirs(output_dir)
    return found[-1] if found else None


def staging_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / rf.CHECKPOINTS / f".step-{step}.tmp"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest(ckpt: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``ckpt`` except trainer_state.json."""
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != STATE)
    return {str(p.relative_to(ckpt)): sha256(p) for p in files}


def verify(ckpt: Path) -> str | None:
    """None if every file listed in the manifest exists with its checksum; else the first bad file's description."""
    try:
        state = json.loads((ckpt / STATE).read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return f"{ckpt / STATE} is unreadable ({e})"
    files = state.get("files")
    if not isinstance(files, dict) or not files:
        return f"{ckpt / STATE} has no file checksums (written by an older version or truncated)"
    for rel, digest in files.items():
        path = ckpt / rel
        if not path.is_file():
            return f"{path} is missing"
        if sha256(path) != digest:
            return f"{path} does not match its checksum (corrupt or truncated)"
    return None


def newest_valid(output_dir: str | Path) -> Path | None:
    """The newest checkpoint that verifies; warns about each newer one that does not.

    None when there is no checkpoint at all; CheckpointError when there are some but none verifies.
    """
    found = checkpoint_dirs(output_dir)
    problems = []
    for ckpt in reversed(found):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        problems.append(problem)
        log.warning("checkpoint %s is not usable: %s; trying an older one", ckpt.name, problem)
    if problems:
        raise CheckpointError(f"no usable checkpoint under {Path(output_dir) / 'checkpoints'}: " + "; ".join(problems))
    return None


def rng_file(rank: int) -> str:
    return f"rng{rank}.safetensors"


def pick_checkpoint(output_dir: Path, info: DistInfo) -> Path | None:
    """Rank 0 picks the newest checkpoint whose checksums verify (CheckpointError if none does); every rank gets it."""
    found, error = None, None
    if info.main:
        try:
            found = newest_valid(output_dir)
        except CheckpointError as e:
            error = str(e)
    found, error = broadcast_object(info, (found, error))
    if error:
        raise CheckpointError(error)
    return found


def save_rng(path: Path, order_state: torch.Tensor) -> None:
    save_file({"torch": torch.get_rng_state(), "order": order_state.contiguous()}, str(path))


def load_rng(path: Path) -> torch.Tensor:
    state = load_file(str(path))
    torch.set_rng_state(state["torch"])
    return state["order"]


def restore_rng(ckpt: Path, rank: int) -> torch.Tensor:
    """This rank's torch RNG restored; returns the task-order generator's state.

    More ranks than the checkpoint had: the task order is the same on every rank (rank 0's); the torch stream
    (dropout masks) is left as it is, so new ranks draw new masks.
    """
    mine = ckpt / rng_file(rank)
    if mine.is_file():
        return load_rng(mine)
    torch_rng = torch.get_rng_state()
    order = load_rng(ckpt / rng_file(0))
    torch.set_rng_state(torch_rng)
    return order


def write_state(tmp: Path, state: dict) -> None:
    """Write trainer_state.json last, with the checksums of everything else in the staging dir."""
    state = {**state, "files": manifest(tmp)}
    path = tmp / STATE
    path.write_text(jsonio.dumps(state, indent=1))
    _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, step: int, keep: int = 0, protect: Path | None = None) -> Path:
    """Rename the staging dir to checkpoints/step-N (atomic on one file system), then keep the newest
    ``keep`` checkpoints (0: all). ``protect`` (the checkpoint a run resumed from) is never deleted."""
    final = tmp.parent / f"step-{step}"
    replace_dir(tmp, final)
    if keep:
        for old in checkpoint_dirs(tmp.parent.parent)[:-keep]:
            if protect is None or old.resolve() != protect.resolve():
                shutil.rmtree(old, ignore_errors=True)
    return final


def save_torch_state(path: Path, state: dict) -> None:
    torch.save(state, path)


def load_torch_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def agreed(info, write) -> None:
    """Run ``write`` on this rank, then all ranks agree (one all-reduce, also the barrier) that every rank's write
    succeeded; a write failure anywhere (a full disk: runtime/fsutil.py) raises CheckpointWriteError on every rank."""
    failure = None
    try:
        write()
    except Exception as e:
        if not is_write_failure(e):
            raise
        failure = e
    if not all_ok(info, failure is None):
        raise CheckpointWriteError(str(failure) if failure is not None else "another rank's write failed")


@contextlib.contextmanager
def write_failures_end_the_run(what: str):
    """A write on rank 0 after training (eval.json, the model card, finished.json) that the machine refuses: one
    CheckpointWriteError saying the adapter and checkpoint are safe and --resume redoes what is missing."""
    try:
        yield
    except Exception as e:
        if not is_write_failure(e):
            raise
        raise CheckpointWriteError(
            f"{what} failed ({e}); the adapter and the final checkpoint are saved: fix the cause (space, "
            "permissions), then run the same command with --resume"
        ) from None


# -- the choreography of one checkpoint across ranks (the trainer calls these two) ------------------------------------
def save(
    output_dir: Path,
    step: int,
    info: DistInfo,
    write_files: Callable[[Path], None],
    trainer_state: Callable[[], dict],
    keep: int = 0,
    protect: Path | None = None,
) -> None:
    """checkpoints/step-N: staging folder (rank 0) -> every rank's files (``write_files(tmp)``) -> trainer_state.json
    with the checksums of all of it (rank 0) -> atomic rename; every phase agreed by all ranks. A write that fails on
    any rank (a full disk, permissions) is known to every rank within seconds and leaves the previous checkpoint the
    newest valid one: CheckpointWriteError (exit 1) on every rank, the staging folder removed."""
    tmp = staging_dir(output_dir, step)
    try:
        if info.main:
            shutil.rmtree(tmp, ignore_errors=True)
        agreed(info, lambda: tmp.mkdir(parents=True) if info.main else None)
        agreed(info, lambda: write_files(tmp))

        def state_and_publish() -> None:
            if info.main:
                write_state(tmp, trainer_state())
                publish(tmp, step, keep=keep, protect=protect)

        agreed(info, state_and_publish)
    except CheckpointWriteError as e:
        if info.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(
            f"writing checkpoint step {step} in {tmp.parent} failed ({e}); the previous checkpoints "
            "are untouched: fix the cause (space, permissions), then run the same command with --resume"
        ) from None


def write_step_files(tmp: Path, info: DistInfo, engine: Any, olr: Any, save_adapter: Callable[[Path], None]) -> None:
    """One rank's part of a checkpoint: the adapter and the replicated engine + OrthoLoRA state (rank 0), the engine's
    partitioned state (every rank, e.g. ZeRO-2's), this rank's RNG and task-order generator."""
    if info.main:
        save_adapter(tmp)
    engine.save_checkpoint(tmp)
    if info.main:
        save_torch_state(tmp / OPTIMIZER, {**engine.state_dict(), "olr": olr.state_dict()})
    save_rng(tmp / rng_file(info.rank), olr.order.generator.get_state())


def restore(found: Path, info: DistInfo, model: Any, names: list[str], engine: Any, olr: Any) -> None:
    """Load what write_step_files wrote (checksums verified first by pick_checkpoint: DeepSpeed's unpickling loader
    sees only files this run's checkpointing wrote)."""
    load_adapter_weights(model, names, found / rf.ADAPTER)
    engine.load_checkpoint(found)
    torch_state = load_torch_state(found / OPTIMIZER)
    engine.load_state_dict({k: v for k, v in torch_state.items() if k != "olr"})
    if "olr" in torch_state:
        olr.load_state_dict(torch_state["olr"])
    olr.order.generator.set_state(restore_rng(found, info.rank))
