"""A short run's output holds our progress and results, not library noise our own calls trigger."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.app.test_app import make_config

ROOT = Path(__file__).resolve().parents[2]
NOISE = (
    "LOAD REPORT",
    "UNEXPECTED",  # our add_pooling_layer=False load
    "is_gradient_checkpointing",
    "gradient_checkpointing_enable",  # deprecated transformers API (PEFT's and ours)
    "FutureWarning",
    "gemm_4bit_forward",
    "kernels-community",  # bitsandbytes, imported by peft, with nothing quantized
    "publisher trust check",  # the same import through `kernels` (transformers >= 5.25 requires it)
    "Loading weights",  # weight-loading bars (ORTHO_LORA_VERBOSE shows them)
    "\r",  # a progress bar redrawn in a log file
)


@pytest.mark.slow
def test_short_run_has_no_library_noise(env, tmp_path):  # noqa: F811
    path = make_config(env, tmp_path / "run", steps=2, gradient_checkpointing=True, plots=False)
    run_env = {k: v for k, v in os.environ.items() if k != "ORTHO_LORA_VERBOSE"}
    # transformers at warning level: a LOAD REPORT would show; our own default (error) would hide it
    run_env.update(
        TRANSFORMERS_VERBOSITY="warning", PYTHONWARNINGS="default", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "ortho_lora_dist.cli", "train", str(path)],
        cwd=tmp_path,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    found = [s for s in NOISE if s in out]
    assert not found, f"library noise {found} in a short run's output:\n{out[-3000:]}"
    assert "train: 2/2" in proc.stderr, "progress is a plain line in a log file"


def test_bitsandbytes_kernel_message_dropped_only_without_quantization(caplog):
    from ortho_lora_dist.models.loading import library_noise

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    message = "Failed to load CPU gemm_4bit_forward from kernels-community: offline. Please make sure ..."
    with caplog.at_level(logging.WARNING, logger="bitsandbytes"):
        with library_noise(quantized=False):
            logger.warning(message)
            logger.warning("another bitsandbytes warning")
        with library_noise(quantized=True):
            logger.warning(message)
        logger.warning(message)
    seen = [r.getMessage() for r in caplog.records]
    assert seen == ["another bitsandbytes warning", message, message]


def test_kernels_trust_message_dropped_only_without_quantization(caplog):
    """transformers >= 5.25 brings `kernels`; bitsandbytes' import then logs that the kernel's publisher was not
    checked offline: dropped with nothing quantized, kept otherwise; other `kernels` warnings always kept."""
    from ortho_lora_dist.models.loading import library_noise

    logger = logging.getLogger("kernels._internals.hf_hub")
    message = (
        "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging Face "
        "Hub is in offline mode."
    )
    with caplog.at_level(logging.WARNING, logger="kernels"):
        with library_noise(quantized=False):
            logger.warning(message)
            logger.warning("Skipping publisher trust check for 'someone/else'")
        with library_noise(quantized=True):
            logger.warning(message)
    seen = [r.getMessage() for r in caplog.records]
    assert seen == ["Skipping publisher trust check for 'someone/else'", message]
