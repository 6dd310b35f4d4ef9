"""Where the memory of a training run goes: peak RSS of each phase of ``ortho-lora train`` (Linux).

The run is the CLI's own (``Trainer(cfg).train()``, one process, nothing re-implemented); the package's functions
are wrapped in place to mark the phases, and the kernel's peak-RSS counter (VmHWM) is reset at every phase
boundary (``/proc/self/clear_refs``), so each phase's peak is its own, exact, not sampled:

  import       torch, transformers, peft and the package imported
  setup        config, tasks, tokenizer, lengths
  load base    from_pretrained of the base model      lora wrap   PEFT's get_peft_model
  place        to the device, activation checkpointing   ortho-lora   capture + buffers   engine   optimizer
  step N       forward (task_loss_sums), backward (olr.backward), project, optimizer (engine.apply)
  save         checkpoint / adapter
  eval SPLIT   generate (predict) and loss (task_loss_sums) of every batch

    python bench/memory_profile.py configs/demo_llm.yaml train.steps=2 [--saved] [--json out.json]
    python bench/memory_profile.py configs/demo_llm.yaml --eval RUN_DIR   # ortho-lora eval

prints one row per phase: RSS at its start and end, and its own peak (children excluded; a child's peak is its
row). The last row is the process's peak: the largest of all (the resets also reset getrusage's ru_maxrss, so
``/usr/bin/time -v`` around this script under-reports; time the CLI itself for that figure). RSS counts the
weights when they are touched: transformers memory-maps an fp32 safetensors file loaded as fp32 (file pages, one
copy). ``--saved``: what step 1's forward keeps for the backward, by module. ``--mmap-threshold``: glibc's
allocator with a fixed mmap threshold, to tell live tensors from freed memory the allocator keeps.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import re
import sys
import tempfile
import time

GB = 1024**3


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) * 1024


def rss() -> int:
    return _status("VmRSS")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


class Phases:
    """A stack of named phases; each phase's own peak (VmHWM between its boundaries, children excluded)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}
        self.stack: list[str] = []
        self.peak = 0  # the process's peak: the kernel's counter is reset at every boundary, so kept here

    def _close_segment(self) -> None:
        peak = _status("VmHWM")
        self.peak = max(self.peak, peak)
        if self.stack:
            row = self.rows[self.stack[-1]]
            row["peak"] = max(row["peak"], peak)
        reset_peak()

    def enter(self, name: str) -> None:
        self._close_segment()
        name = f"{self.stack[-1]} / {name}" if self.stack and not name.startswith(self.stack[-1]) else name
        row = self.rows.setdefault(name, {"start": rss(), "peak": 0, "end": 0, "calls": 0, "seconds": 0.0})
        row["calls"] += 1
        row["_t"] = time.perf_counter()
        self.stack.append(name)

    def exit(self) -> None:
        self._close_segment()
        name = self.stack.pop()
        row = self.rows[name]
        row["end"] = rss()
        row["seconds"] += time.perf_counter() - row.pop("_t")

    def wrap(self, owner, attr: str, name: str) -> None:
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def marked(*a, **kw):
            self.enter(name)
            try:
                return fn(*a, **kw)
            finally:
                self.exit()

        setattr(owner, attr, marked)

    def table(self) -> str:
        out = [f"{'phase':<42} {'calls':>5} {'s':>7} {'RSS start':>10} {'own peak':>10} {'RSS end':>10}"]
        for name, r in self.rows.items():
            out.append(
                f"{name:<42} {r['calls']:>5} {r['seconds']:>7.1f} {r['start'] / GB:>9.2f}G {r['peak'] / GB:>9.2f}G "
                f"{r['end'] / GB:>9.2f}G"
            )
        return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key.sub=value, as for ortho-lora train")
    p.add_argument("--eval", metavar="ADAPTER", help="profile `ortho-lora eval --adapter ADAPTER` instead of training")
    p.add_argument(
        "--saved",
        action="store_true",
        help="also: the tensors step 1's forward saves for the backward, by module (bytes of distinct storages)",
    )
    p.add_argument(
        "--mmap-threshold",
        type=int,
        metavar="BYTES",
        help="glibc mallopt(M_MMAP_THRESHOLD): allocations of at least BYTES get their own mapping, returned on "
        "free (the same as MALLOC_MMAP_THRESHOLD_=BYTES; the default threshold grows up to 32 MB)",
    )
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    if args.mmap_threshold is not None:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, args.mmap_threshold)  # M_MMAP_THRESHOLD

    phases = Phases()
    phases.enter("import")
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from ortho_lora_dist.config import load_config
    from ortho_lora_dist.evaluation import evaluate, loader
    from ortho_lora_dist.models import build, causal_lm
    from ortho_lora_dist.models.causal_lm import CausalLMMultiTask
    from ortho_lora_dist.training import recipe

    phases.exit()

    phases.wrap(recipe.Trainer, "setup", "setup")
    phases.wrap(loader, "load_for_eval", "setup")
    phases.wrap(causal_lm, "from_pretrained", "load base")
    phases.wrap(causal_lm, "attach_lora", "lora wrap")
    phases.wrap(build, "place_model", "place")
    phases.wrap(build, "enable_activation_checkpointing", "activation checkpointing")
    phases.wrap(recipe, "build_ortho_lora", "ortho-lora")
    phases.wrap(recipe, "build_engine", "engine")
    phases.wrap(recipe, "save_adapter", "save adapter")
    phases.wrap(recipe.ckpt, "save", "checkpoint")
    phases.wrap(CausalLMMultiTask, "predict", "generate")
    phases.wrap(CausalLMMultiTask, "task_loss_sums", "loss forward")
    run_eval = evaluate.run_eval

    def marked_eval(model, tasks, split, *a, **kw):
        phases.enter(f"eval {split}")
        try:
            return run_eval(model, tasks, split, *a, **kw)
        finally:
            phases.exit()

    recipe.run_eval = evaluate.run_eval = marked_eval
    saved: dict = {}
    step = recipe.Trainer.train_step

    def marked_step(self):
        phases.enter(f"step {self.state.step + 1}")
        try:
            olr = self.olr
            if not getattr(olr, "_marked", False):  # per instance: the backward, project and optimizer phases
                for attr, name in (("backward", "backward"), ("project", "project")):
                    setattr(olr, attr, _marked(phases, getattr(olr, attr), name))
                self.engine.apply = _marked(phases, self.engine.apply, "optimizer")
                olr._marked = True
            if args.saved and not saved:  # step 1's forward only (not a checkpointed recompute in the backward)
                forward = self.model.task_loss_sums

                def accounted(*a, **kw):
                    with saved_by_module(self.model, saved):
                        return forward(*a, **kw)

                self.model.task_loss_sums = accounted
                try:
                    return step(self)
                finally:
                    del self.model.task_loss_sums
            return step(self)
        finally:
            phases.exit()

    recipe.Trainer.train_step = marked_step

    with tempfile.TemporaryDirectory() as tmp:
        if args.eval:
            cfg = load_config(args.config, args.overrides)
            from ortho_lora_dist.artifacts.adapter import find_adapter

            ev = loader.load_for_eval(cfg, find_adapter(args.eval))
            evaluate.run_final_eval(ev.model, ev.tasks, ev.info, recipe.eval_batch_size(cfg))
        else:
            cfg = load_config(args.config, [f"output_dir={tmp}/run", "train.plots=false", *args.overrides])
            recipe.Trainer(cfg).train()
    phases._close_segment()
    print(phases.table())
    print(f"{'process peak':<42} {phases.peak / GB:>35.2f}G")
    if saved:
        print(f"\nsaved for the backward by step 1's forward: {sum(saved.values()) / GB:.2f} GB (weights included)")
        for (module, features, dtype), n in sorted(saved.items(), key=lambda kv: -kv[1])[:25]:
            print(f"  {n / 2**20:9.1f} MB  {module}  [..., {features}] {dtype}")
    if args.json:
        with open(args.json, "w") as f:
            rows = {f"{m} [{f}] {d}": n for (m, f, d), n in saved.items()}
            json.dump({"argv": sys.argv[1:], "peak": phases.peak, "phases": phases.rows, "saved": rows}, f, indent=1)
    return 0


@contextlib.contextmanager
def saved_by_module(model, out: dict):
    """Bytes of the distinct storages autograd saves inside ``with``, by (innermost module, last dim, dtype);
    layer numbers folded (layers.N). Parameters a backward needs (a Linear's weight) count too."""
    import torch

    names = {m: re.sub(r"layers\.\d+", "layers.N", n) for n, m in model.named_modules()}
    stack: list = []
    seen: set[int] = set()
    hooks = []

    def enter(module, args) -> None:
        stack.append(module)

    def leave(module, args, output) -> None:  # returns None: the output stays the module's
        stack.pop()

    for m in model.modules():
        hooks += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            name = names.get(stack[-1], "?") if stack else "(outside any module)"
            name = name.removeprefix("model.base_model.model.")
            key = (name, t.shape[-1] if t.dim() else 1, str(t.dtype).removeprefix("torch."))
            out[key] = out.get(key, 0) + storage.nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
    finally:
        for h in hooks:
            h.remove()


def _marked(phases: Phases, fn, name: str):
    @functools.wraps(fn)
    def marked(*a, **kw):
        phases.enter(name)
        try:
            return fn(*a, **kw)
        finally:
            phases.exit()

    return marked


if __name__ == "__main__":
    sys.exit(main())
