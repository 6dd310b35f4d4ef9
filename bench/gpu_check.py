"""One-command GPU check: CUDA exactness of the one-backward capture, then a 7B-shaped QLoRA benchmark.

    bash scripts/gpu_check.sh [out.json]             # on a GPU machine: at most 8 minutes on one H200
    python bench/gpu_check.py --tiny --out x.json    # the same code end to end on CPU, tiny shapes (seconds)

Prints ONE JSON summary on stdout (progress goes to stderr) and writes it to ``--out``; the file is also
rewritten after every stage, so a run cut short by a timeout still leaves its partial results
(``"complete": false``). Exit status 0 when every exactness check passed and no method failed.

(a) exactness: per-task LoRA gradients of the one-backward capture against T separate backward passes
    (``OrthoLoRA(mode="reference")``) on Llama-shaped models built at random from a config (no download):
    NF4 base through the bitsandbytes CUDA kernels, fp32 and bf16 compute, bf16 autocast, reentrant gradient
    checkpointing (capture checkpointed, reference not), LoRA dropout, padded mixed-task batches covering the
    capture's three row layouts (interleaved -> index, sorted equal -> bmm, contiguous runs -> slice); plus our
    ``joint`` combined gradient against plain PEFT's summed-loss ``.grad``; packed rows (train.packing, sdpa)
    against the same samples padded, fp32 and bf16 autocast + checkpointing; last, one check on the 7B model
    itself. Metric: max over tasks of ||g_t - g_t_ref|| / ||g_t_ref|| (every g_t_ref must be non-zero).
    Tolerances: 1e-5 on fp32 paths (same matmuls, other summation order; TF32 off), 1e-2 under bf16
    autocast (the reference's weight-grad matmul over the whole batch rounds to bf16 differently), 5e-2 for
    packed vs padded under bf16 (the forward runs on other shapes: activations round differently).
(b) benchmark: Llama-2-7B config, random init, NF4 (double quant, bf16 compute), LoRA r=16 on all linear
    layers, dropout 0.05, reentrant checkpointing, bf16 autocast; T tasks x ``--per-task`` sequences per step,
    seq 1024 and 2048, T = 3 and 8. Methods, interleaved round-robin on one model and one AdamW:
      peft_joint       plain PEFT, no capture installed: one backward of the summed loss
      joint            our capture, strategy joint (one backward + per-task buffer)
      ortho            our capture, strategy ortho at factor granularity (the paper's method)
      upgrad_global    our capture, TorchJD UPGrad on the global Gram matrix
      ortho_reference  the paper's way: T backward passes (retain_graph), then ortho
    Reported per method: median step time, tokens/s, peak GPU memory (torch.cuda.max_memory_allocated, reset
    before each step; model, optimizer state and our per-task buffer included) and ratios vs peft_joint.
    Warm-up steps are not timed. Model init time is reported (build, quantize, PEFT).
    Then packed vs padded rows (train.packing, ortho, 8 samples of seq/8..seq tokens, seq = the first of --seqs):
    useful tokens/s of each and packing efficiency ("packing" in the summary; skipped when the budget is spent).
    Time budget: ``--budget`` seconds from start (default 420, inside the shell script's 480 s timeout);
    configurations run from cheapest to dearest, one is skipped when its estimated minimum (warm-up + one
    timed round, extrapolated from the previous one) would overrun, and a running one stops early
    ("status": "truncated") when the next round would. A T-backward step costs about (1 + 3T)/4 joint steps
    under checkpointing, so the reference gets fewer steps (``--ref-warmup``, ``--ref-steps``).

Building a random 7B in NF4 on the GPU, fast: the model is constructed directly on the GPU in bf16
(``torch.device("cuda")`` + default dtype bf16: 13.5 GB, random init by GPU kernels, seconds), then every
decoder nn.Linear is swapped for a ``bnb.nn.Linear4bit`` built on the meta device (no CPU allocation, no
CPU init) whose ``Params4bit`` wraps the bf16 CUDA weight and is quantized in place on the GPU by ``.to``;
the bf16 weight is then freed. No CPU round trip and no checkpoint on disk (``from_pretrained`` with a
BitsAndBytesConfig would need 13.5 GB written and read back). bench/gpu_qlora.py, by contrast, initialises
in fp32 and builds every Linear4bit on the CPU (7B-element CPU init): slower, so its builder is not reused.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:  # run as `python bench/gpu_check.py` without PYTHONPATH: the package bench/ lies in ROOT
    sys.path.append(ROOT)

# each check in its own module of bench/gpu_checks/: exactness (capture vs T backwards, vs plain PEFT), packing
# (packed vs padded rows), benchmark (timing, memory), environment (setup); shared helpers in common.
# The first import of bench.gpu_checks starts the run's clock T0, before torch loads (this file does not import it).
from bench.gpu_checks.benchmark import run_bench  # noqa: E402
from bench.gpu_checks.common import T0, log  # noqa: E402
from bench.gpu_checks.environment import pick_device, record_setup  # noqa: E402
from bench.gpu_checks.exactness import run_exactness  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.json", help="JSON summary file (default gpu_check.json)")
    p.add_argument("--tiny", action="store_true", help="tiny Llama, few steps: the same code end to end on CPU")
    p.add_argument(
        "--quant", choices=("auto", "nf4", "none"), default="auto", help="auto: nf4 on CUDA, none (fp32 Linear) on CPU"
    )
    p.add_argument("--seqs", type=int, nargs="+", help="sequence lengths (default 1024 2048; --tiny: 32 64)")
    p.add_argument("--tasks", type=int, nargs="+", default=[3, 8])
    p.add_argument("--per-task", type=int, default=1, help="sequences of each task per step")
    p.add_argument("--warmup", type=int, help="untimed warm-up steps per method (default 2; --tiny 1)")
    p.add_argument("--steps", type=int, help="timed steps per method (default 4; --tiny 2)")
    p.add_argument("--ref-warmup", type=int, default=1, help="warm-up steps of the T-backward reference")
    p.add_argument("--ref-steps", type=int, help="timed steps of the T-backward reference (default 2; --tiny 1)")
    p.add_argument("--budget", type=float, default=420.0, help="seconds from start after which no new round starts")
    p.add_argument("--only", choices=("all", "exactness", "bench"), default="all")
    args = p.parse_args(argv)
    args.seqs = args.seqs or ([32, 64] if args.tiny else [1024, 2048])
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    args.steps = args.steps if args.steps is not None else (2 if args.tiny else 4)
    args.ref_steps = args.ref_steps if args.ref_steps is not None else (1 if args.tiny else 2)

    stdout = sys.stdout
    summary: dict = {
        "complete": False,
        "ok": False,
        "setup": {},
        "exactness": {"passed": False, "checks": []},
        "benchmark": {"model": None, "results": []},
        "elapsed_s": None,
    }

    def write():
        summary["elapsed_s"] = round(time.monotonic() - T0, 1)
        tmp = f"{args.out}.tmp"
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=1)
        os.replace(tmp, args.out)

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 renames (checkpointing), not ours to fix
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the one JSON summary only
        device, quant = pick_device(args.quant)
        record_setup(summary["setup"], args, device, quant)
        failed = False
        try:
            if device.type != "cuda" and not args.tiny:
                raise RuntimeError("no CUDA device: the 7B check needs a GPU (use --tiny for the CPU path)")
            if args.only in ("all", "exactness"):
                summary["exactness"]["checks"] = run_exactness(args, device, quant)
                summary["exactness"]["passed"] = all(c["passed"] for c in summary["exactness"]["checks"])
                write()
            if args.only in ("all", "bench"):
                run_bench(args, device, quant, summary, write)
            summary["complete"] = True
        except Exception as e:
            failed = True
            summary["error"] = f"{type(e).__name__}: {e}"
            log(traceback.format_exc())
        bench_ok = all(r["status"] != "error" for r in summary["benchmark"]["results"])
        summary["ok"] = (
            not failed
            and summary["exactness"]["passed"]
            and bench_ok
            and (args.only == "exactness" or bool(summary["benchmark"]["results"]))
        )
        write()
    print(json.dumps(summary, indent=1), file=stdout, flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
