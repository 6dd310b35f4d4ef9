"""Records the environment (device, torch / CUDA and library versions, the run's settings) and picks the device."""

from __future__ import annotations

import torch

from bench.gpu_checks.benchmark import BENCH_METHODS
from bench.gpu_checks.exactness import BF16_TOL, FP32_TOL


def pick_device(quant: str) -> tuple[torch.device, str]:
    """The CUDA device if there is one, else the CPU; --quant auto -> nf4 on CUDA, none (fp32 Linear) on CPU."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    return device, quant if quant != "auto" else ("nf4" if cuda else "none")


def record_setup(setup: dict, args, device: torch.device, quant: str) -> None:
    """Fill the summary's "setup" in place (a library that is missing shows as "missing (...)", not an error)."""
    cuda = device.type == "cuda"
    setup.update(
        device=torch.cuda.get_device_name(device) if cuda else "cpu",
        tiny=args.tiny,
        quant=quant,
        torch=torch.__version__,
        cuda=torch.version.cuda if cuda else None,
        seqs=args.seqs,
        tasks=args.tasks,
        per_task=args.per_task,
        warmup=args.warmup,
        steps=args.steps,
        ref_warmup=args.ref_warmup,
        ref_steps=args.ref_steps,
        budget_s=args.budget,
        methods=list(BENCH_METHODS),
        tolerances={"fp32": FP32_TOL, "bf16_autocast": BF16_TOL},
    )
    for mod in ("transformers", "peft", "bitsandbytes", "torchjd"):
        try:
            setup[mod] = __import__(mod).__version__
        except Exception as e:  # torchjd has no __version__; a missing one shows here
            from importlib.metadata import PackageNotFoundError, version

            try:
                setup[mod] = version(mod)
            except PackageNotFoundError:
                setup[mod] = f"missing ({type(e).__name__})"
