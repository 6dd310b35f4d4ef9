"""``ortho-lora``: train | eval | predict | merge | plot | launch | compare | init | prepare-demo | diagnose | config.

One module per sub-command, each holding its arguments (``add_parser(sub)``) and its handler (``handle(args)``);
this module assembles the parser, runs the handler and maps exceptions to exit codes. Nothing here, and nothing
a sub-command module imports at its top, pulls torch in: ``ortho-lora --help`` starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import ortho_lora_dist.cli.compare as compare
import ortho_lora_dist.cli.config as config
import ortho_lora_dist.cli.diagnose as diagnose
import ortho_lora_dist.cli.eval as eval
import ortho_lora_dist.cli.init as init
import ortho_lora_dist.cli.launch as launch
import ortho_lora_dist.cli.merge as merge
import ortho_lora_dist.cli.plot as plot
import ortho_lora_dist.cli.predict as predict
import ortho_lora_dist.cli.prepare_demo as prepare_demo
import ortho_lora_dist.cli.train as train

# in the order `ortho-lora --help` lists them
COMMANDS = (train, eval, predict, merge, plot, launch, compare, init, prepare_demo, diagnose, config)

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from ortho_lora_dist import __version__

    p = argparse.ArgumentParser(prog="ortho-lora", description="Exact Ortho-LoRA multi-task LoRA/QLoRA fine-tuning")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not os.environ.get("ORTHO_LORA_VERBOSE"):  # library bars and load reports off unless asked for
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        if "transformers" in sys.modules:  # imported before main() (called in-process): the env var came too late
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
    # others' libraries at WARNING; ours at INFO (normal progress), WARNING only for what asks for action
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S"
    )
    logging.getLogger("ortho_lora_dist").setLevel(logging.INFO)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may also come after options (`train cfg.yaml --resume train.steps=9`)
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from ortho_lora_dist.runtime.signals import Interrupted

    try:
        return args.func(args)
    except Interrupted as e:
        print(f"stopped by {e} while loading, before training: nothing was written", file=sys.stderr)
        return 0
    except Exception as e:
        code = _exit_code(e)
        if code is None:
            raise
        print(f"error: {'the run failed: ' if code == 1 else ''}{e}", file=sys.stderr)
        return code


def _exit_code(e: Exception) -> int | None:
    """2: bad input or a refused operation (one line, no traceback); 1: a run that failed; None: a bug (traceback)."""
    from ortho_lora_dist.artifacts.adapter import AdapterError
    from ortho_lora_dist.config import ConfigError
    from ortho_lora_dist.data.loading import DataError
    from ortho_lora_dist.training.checkpoint import CheckpointError, CheckpointWriteError
    from ortho_lora_dist.training.resume import ResumeMismatch
    from ortho_lora_dist.training.run_dir import RunExists, RunLocked
    from ortho_lora_dist.training.state import TooManySkips, TrainingFailed
    from ortho_lora_dist.training.telemetry import TrackerError

    if isinstance(e, (TrainingFailed, CheckpointWriteError)):
        return 1
    if isinstance(
        e,
        (
            ConfigError,
            DataError,
            FileNotFoundError,
            FileExistsError,
            RunLocked,
            RunExists,
            ResumeMismatch,
            CheckpointError,
            TooManySkips,
            AdapterError,
            TrackerError,
        ),
    ):
        return 2
    from ortho_lora_dist.runtime.fsutil import is_write_failure

    if isinstance(e, OSError) or is_write_failure(e):  # the machine refused (disk full, permissions, I/O): one line
        return 1
    return None
