"""Time per optimizer step of every strategy's weights (aggregators.py) at the Llama-2-7B adapter shape.

Llama-2-7B, LoRA r=16 on all linear layers: 32 layers x 7 modules = 224 LoRA layers, so 448 blocks at
granularity ``factor``, 224 at ``module``, 1 at ``global``. Only the [B, T, T] -> [B, T] step is timed
(random PSD Grams from random [T, k] matrices: timing only), on CPU, where the TorchJD weightings run
anyway. A combination whose first estimate (from a subset of blocks) exceeds ``--extrapolate-above``
seconds per step is not run in full: its time is the subset's per-block time x B, marked "~".
``--gram`` also times forming the Grams from the fp32 per-task gradients at that shape (fp32 / gram() / fp64).

    python bench/aggregator_cost.py                 # about 2-3 minutes on 2 cores
    python bench/aggregator_cost.py --tasks 3 --methods ortho upgrad --gram
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch

from ortho_lora_dist.core.gram import gram, gram_fp64
from ortho_lora_dist.core.strategies import STRATEGIES, make_strategy

LAYERS, HIDDEN, INTER, RANK = 32, 4096, 11008, 16
BLOCKS = {"factor": 2 * 7 * LAYERS, "module": 7 * LAYERS, "global": 1}


def factor_sizes() -> list[int]:
    """numel of every LoRA factor of Llama-2-7B at r=16 (A: r x in, B: out x r), in layer order."""
    shapes = [(HIDDEN, HIDDEN)] * 4 + [(HIDDEN, INTER)] * 2 + [(INTER, HIDDEN)]  # q k v o, gate up, down: (in, out)
    return [n for _ in range(LAYERS) for i, o in shapes for n in (RANK * i, o * RANK)]


def random_grams(B: int, T: int, k: int = 32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(B, T, k, generator=gen, dtype=torch.float64)
    return J @ J.transpose(-1, -2)


def time_call(strategy, grams: torch.Tensor, reps: int) -> float:
    """Median seconds of ``reps`` calls (after any warm-up done by the caller)."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        strategy.weights(grams, list(range(grams.shape[-1])))
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def measure(name: str, T: int, B: int, args) -> tuple[float, str]:
    """(seconds per step, note) for one method at B blocks."""
    sub = min(B, args.subset)
    s = make_strategy(name, None, T, sub)
    g = random_grams(sub, T)
    s.weights(g, list(range(T)))  # warm-up: imports, cvxpy problem construction (Nash-MTL), first-call costs
    est = time_call(s, random_grams(sub, T, seed=1), 1) * B / sub
    if est > args.extrapolate_above:
        return est, f"~ (from {sub} blocks)"
    s = make_strategy(name, None, T, B)
    grams = random_grams(B, T, seed=2)
    if name in ("nash_mtl", "gradvac") or est < 1.0:  # per-block state built on the first call; cheap warm-up
        s.weights(grams, list(range(T)))
    reps = max(1, min(args.reps, int(args.budget / max(est, 1e-6))))
    return time_call(s, grams, reps), ""


def gram_cost(T: int) -> str:
    """Forming the 448 factor Grams from fp32 per-task gradients of the 7B adapter: fp32, gram() (CPU: fp32 with
    a range check), fp64 (what gram() does on CUDA)."""
    sizes = factor_sizes()
    rows = [torch.randn(T, n) for n in sizes]
    out = []
    for name, fn in (("fp32", lambda r: r @ r.t()), ("projection.gram", gram), ("fp64", gram_fp64)):
        fn(rows[0])
        t = time.perf_counter()
        for r in rows:
            fn(r)
        out.append(f"{name} {1e3 * (time.perf_counter() - t):.0f} ms")
    return f"Gram formation (CPU), T={T}, {sum(sizes) / 1e6:.1f}M LoRA parameters, {len(sizes)} factors: " + ", ".join(
        out
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, nargs="+", default=[3, 8])
    p.add_argument("--methods", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    p.add_argument("--granularities", nargs="+", default=list(BLOCKS), choices=list(BLOCKS))
    p.add_argument("--reps", type=int, default=3, help="timed calls per combination (at most)")
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timed calls per combination (about)")
    p.add_argument("--subset", type=int, default=8, help="blocks of the first estimate")
    p.add_argument(
        "--extrapolate-above", type=float, default=10.0, help="s/step above which the subset estimate is reported"
    )
    p.add_argument("--impractical-ms", type=float, default=100.0)
    p.add_argument(
        "--gram", action="store_true", help="also time forming the Grams (fp32 / gram() / fp64) at the 7B shape"
    )
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="You are solving a parameterized problem that is not DPP")
    start = time.perf_counter()
    cols = [(T, g) for T in args.tasks for g in args.granularities]
    cells: dict[str, list[str]] = {m: [] for m in args.methods}
    for m in args.methods:
        for T, g in cols:
            sec, note = measure(m, T, BLOCKS[g], args)
            ms = 1e3 * sec
            mark = " **x**" if ms > args.impractical_ms else ""
            cells[m].append(f"{ms:,.1f}{mark}" if not note else f"~{ms:,.0f}{mark}")
    print(
        f"ms per optimizer step for the weights of B blocks (Llama-2-7B, r=16, all linear; CPU, torch threads "
        f"{torch.get_num_threads()}, {os.cpu_count()} cores). "
        f"**x**: over {args.impractical_ms:.0f} ms/step (impractical); "
        f"~: extrapolated from {args.subset} blocks (estimate over {args.extrapolate_above:.0f} s/step).\n"
    )
    print("| method | " + " | ".join(f"T={T} {g} (B={BLOCKS[g]})" for T, g in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for m in args.methods:
        print(f"| {m} | " + " | ".join(cells[m]) + " |")
    if args.gram:
        print()
        for T in args.tasks:
            print(gram_cost(T))
    print(f"\n(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
