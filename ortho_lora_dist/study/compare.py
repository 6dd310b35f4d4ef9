"""``ortho-lora compare``: single-task vs joint vs multi-task rules, over seeds, with paired statistics.

Every method runs with the same config, budget (optimizer steps), data order and seeds; only the
gradient combination (or, for ``lossweights``, the static task weights) differs. Single-task trains one
adapter per task with that task alone, for the same number of steps. Choices are made on the validation
split; the table reports the test split when the tasks have one. Finished runs (finished.json present)
are not redone, so an interrupted comparison resumes where it stopped. Runs are interleaved (for each
seed, every method in turn), so machine noise spreads over all methods alike.

Methods: ``zero_shot`` (causal LM: the untrained base model, evaluated once), ``single``, ``joint``,
``ortho-factor``, ``ortho-module``, ``pcgrad-global`` (ours at global granularity = flat PCGrad with one
order), any ``STRATEGY-GRANULARITY`` (e.g. ``upgrad-global``, ``norm_balance-factor``; a bare strategy name
means ``-global``; ``+debiased`` / ``+ema`` after it: the rule on the signal Gram, train.gram), and ``lossweights``:
joint training
with static per-task loss weights chosen on validation (seed 0) from the grid {all 1} U {task t x3, others 1}.

Reported per method: per-task metric mean and 95% CI across seeds (Student t), their average (over the
``score`` tasks: all by default; a subset when the others are auxiliary tasks trained for the sake of the scored
ones, as the variations study's shuffled-label task; the paired differences, gap recovery, validation average
and time to target all use that same average), the gap
recovery (method - joint) / (single - joint), the paired difference of the average vs joint per seed with
its 95% CI and the count of positive seeds, the validation average, leverage telemetry (mean relative
change of the update vs joint, mean cos(combined, joint), fraction of task-steps with a negative first-order
gain), the conflict rate, and seconds per step relative to joint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ortho_lora_dist.config import Config
from ortho_lora_dist.runtime import jsonio
from ortho_lora_dist.runtime import run_files as rf
from ortho_lora_dist.study.compare_defaults import DEFAULT_METHODS
from ortho_lora_dist.study.compare_plot import plot
from ortho_lora_dist.study.compare_table import to_markdown
from ortho_lora_dist.study.geometry import mean_geometry, run_geometry
from ortho_lora_dist.study.time_to_accuracy import mean as _mean
from ortho_lora_dist.study.time_to_accuracy import median, time_to_target, validation_curve

FIXED = {
    "zero_shot": {},  # the untrained base model (causal LM), evaluated like the others (study/zero_shot.py)
    "single": {},
    "joint": {"strategy": "joint"},
    "ortho-factor": {"strategy": "ortho", "granularity": "factor"},
    "ortho-module": {"strategy": "ortho", "granularity": "module"},
    "pcgrad-global": {"strategy": "ortho", "granularity": "global"},
    "lossweights": {"strategy": "joint"},
}
LOSS_WEIGHT_FACTOR = 3.0


GRAM_SUFFIXES = ("debiased", "ema")  # METHOD+debiased / METHOD+ema: the rule on a signal Gram (train.gram)


def method_settings(method: str) -> dict:
    """train.* settings of a method name (``+debiased`` / ``+ema``: train.gram); ValueError naming the valid forms."""
    base, plus, gram = method.partition("+")
    if plus:
        if gram not in GRAM_SUFFIXES or base in ("zero_shot", "single", "lossweights"):
            raise ValueError(
                f"unknown method {method!r}: a Gram rule may end in +{' or +'.join(GRAM_SUFFIXES)} "
                "(train.gram), e.g. norm_balance-global+debiased"
            )
        return {**method_settings(base), "gram": gram}
    if method in FIXED:
        return dict(FIXED[method])
    from ortho_lora_dist.core.strategies import strategy_names

    name, _, gran = method.rpartition("-")
    if gran not in ("factor", "module", "global"):
        name, gran = method, "global"
    if name not in strategy_names():
        raise ValueError(
            f"unknown method {method!r}: use one of {sorted(FIXED)} or STRATEGY[-factor|-module|-global][+debiased|"
            f"+ema] with STRATEGY in {list(strategy_names())}"
        )
    return {"strategy": name, "granularity": gran}


def _variant(cfg: Config, method: str, seed: int, out: Path, task: int | None = None, loss_weights=None) -> Config:
    tree = cfg.model_dump()
    tree["train"].update(method_settings(method), seed=seed, plots=False)
    if task is not None:
        tree["tasks"] = [tree["tasks"][task]]
    if loss_weights is not None:
        for t, w in zip(tree["tasks"], loss_weights):
            t["loss_weight"] = w
    tree["output_dir"] = str(out)
    return Config.model_validate(tree)


class UnknownTask(ValueError):
    """A ``score`` name that is not one of the config's tasks."""


class CompareInterrupted(RuntimeError):
    """A stop signal reached one of the runs: it checkpointed; the same command resumes the comparison."""


def _run(cfg: Config, scored: list[str]) -> dict:
    from ortho_lora_dist.training.recipe import Trainer

    out = Path(cfg.output_dir)
    if not (out / rf.FINISHED).is_file():  # resume a stopped run; a fresh one starts without the resume warning
        result = Trainer(cfg, resume=out.is_dir() and any(out.iterdir())).train()
        if result.get("interrupted"):
            raise CompareInterrupted(f"stopped during {out} (checkpoint written): run the same command again to resume")
    records = [json.loads(x) for x in (out / rf.METRICS).read_text().splitlines() if x.strip()]
    own = [t.name for t in cfg.tasks]
    steps = [r for r in records if "loss" in r]
    gains = [g for r in steps for g in r.get("gain", {}).values() if g is not None]
    return {
        **_eval_rows(json.loads((out / rf.EVAL).read_text())),
        "seconds_per_step": _mean([r["seconds_per_step"] for r in steps]),
        "conflict_rate": _mean([r["conflict_rate/all"] for r in steps if "conflict_rate/all" in r]),
        "change": _mean([r.get("leverage/change") for r in steps if "leverage/change" in r]),
        "cos_joint": _mean([r.get("leverage/cos_joint") for r in steps if "leverage/cos_joint" in r]),
        "negative_gain": (sum(g < 0 for g in gains) / len(gains)) if gains else float("nan"),
        "geometry": run_geometry(steps, own),
        "curve": validation_curve(records, [n for n in scored if n in own] or own),  # own: a single-task run
    }


def _eval_rows(ev: dict) -> dict:
    """A run's eval.json as compare reads it: per-task metrics of the reported split (test if any), validation."""
    split = "test" if "test" in ev else "validation"
    return {
        "metrics": {k: v for k, v in ev[split].items() if k != "average"},
        "validation": {k: v for k, v in ev.get("validation", {}).items() if k != "average"},
        "split": split,
    }


def _zero_shot(cfg: Config) -> dict:
    from ortho_lora_dist.study.zero_shot import evaluate_zero_shot

    nan = float("nan")
    return {
        **_eval_rows(json.loads(evaluate_zero_shot(cfg).read_text())),
        **dict.fromkeys(("seconds_per_step", "conflict_rate", "change", "cos_joint", "negative_gain"), nan),
    }


def _ci95(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% Student-t interval (0 for one value)."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n))


def _avg(metrics: dict, names: list[str]) -> float:
    return sum(metrics[n] for n in names) / len(names)


def _choose_loss_weights(cfg: Config, out: Path, names: list[str], scored: list[str]) -> dict:
    """The grid {all 1} U {task t x LOSS_WEIGHT_FACTOR}, each trained at seed 0; the best validation average wins."""
    grid = [[1.0] * len(names)] + [
        [LOSS_WEIGHT_FACTOR if i == t else 1.0 for i in range(len(names))] for t in range(len(names))
    ]
    scores = []
    for w in grid:
        tag = "uniform" if all(x == 1.0 for x in w) else f"x{LOSS_WEIGHT_FACTOR:g}-{names[w.index(LOSS_WEIGHT_FACTOR)]}"
        where = out / "runs" / "joint" / "seed0" if tag == "uniform" else out / "runs" / "lossweights-grid" / tag
        r = _run(_variant(cfg, "joint", 0, where, loss_weights=w), scored)
        scores.append({"weights": dict(zip(names, w)), "tag": tag, "validation_average": _avg(r["validation"], scored)})
    best = max(scores, key=lambda x: x["validation_average"])
    return {"grid": scores, "chosen": best}


def compare(
    cfg: Config,
    seeds: int,
    out_dir: str | Path,
    methods: list[str] | None = None,
    eval_every: int | None = None,
    score: list[str] | None = None,
) -> dict:
    """Every method x seed (interleaved, resumable); ``eval_every``: validation every N steps for the curves and
    time to accuracy (default: the config's train.eval_every; 0: final evaluation only, no time to accuracy);
    ``score``: the tasks the average is taken over (default all; every task is still trained and tabled)."""
    methods = list(methods or DEFAULT_METHODS)
    for m in methods:
        method_settings(m)  # refuse unknown names before any run
    names = [t.name for t in cfg.tasks]
    for n in score or []:
        if n not in names:
            raise UnknownTask(f"unknown task {n!r}: the config's tasks are {names}")
    scored = [n for n in names if n in (score or names)]  # in the config's order
    if "zero_shot" in methods:  # refused for an encoder before any run trains
        from ortho_lora_dist.study.zero_shot import check_zero_shot

        check_zero_shot(cfg)
    if eval_every is not None:
        tree = cfg.model_dump()
        tree["train"]["eval_every"] = eval_every
        cfg = Config.model_validate(tree)
    out = Path(out_dir)
    tuned = None
    if "lossweights" in methods:
        tuned = _choose_loss_weights(cfg, out, names, scored)
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in range(seeds):  # interleaved: every method has its seed s before any has s + 1
        for m in methods:
            runs[m].append(_run_method(cfg, m, seed, out, names, scored, tuned))
    summary: dict = {
        "seeds": seeds,
        "split": runs[methods[0]][0]["split"],
        "tasks": names,
        "scored": scored,
        "methods": {},
    }
    if tuned:
        summary["lossweights"] = tuned
    joint_time = _mean([r["seconds_per_step"] for r in runs["joint"]]) if "joint" in runs else None
    for m in methods:
        summary["methods"][m] = _method_entry(m, runs, names, scored, joint_time)
    if "single" in runs and "joint" in runs:
        for m in methods:
            if m not in ("single", "joint"):
                summary["methods"][m]["gap_recovery"] = _gap_recovery(summary["methods"], m, names)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(jsonio.dumps(summary, indent=1))
    (out / "compare.md").write_text(to_markdown(summary))
    plot(summary, out / "compare.png")
    return summary


def _run_method(cfg: Config, m: str, seed: int, out: Path, names: list[str], scored: list[str], tuned) -> dict:
    """One seed of method ``m``: its run's record (single: one run per task, merged; zero_shot: once)."""
    if m == "single":
        parts = [
            _run(_variant(cfg, m, seed, out / "runs" / m / f"seed{seed}" / n, t), scored) for t, n in enumerate(names)
        ]
        return {
            "metrics": {k: v for p in parts for k, v in p["metrics"].items()},
            "split": parts[0]["split"],
            "validation": {k: v for p in parts for k, v in p["validation"].items()},
            "seconds_per_step": sum(p["seconds_per_step"] for p in parts),
            "conflict_rate": float("nan"),
            "change": float("nan"),
            "cos_joint": float("nan"),
            "negative_gain": float("nan"),
        }
    if m == "zero_shot":
        return _zero_shot(_variant(cfg, m, 0, out / "runs" / m))  # greedy: once, every seed
    if m == "lossweights":
        w = [tuned["chosen"]["weights"][n] for n in names]
        tag = tuned["chosen"]["tag"]
        where = out / "runs" / ("joint" if tag == "uniform" else f"lossweights-{tag}") / f"seed{seed}"
        if seed == 0 and tag != "uniform":
            where = out / "runs" / "lossweights-grid" / tag
        return _run(_variant(cfg, "joint", seed, where, loss_weights=w), scored)
    return _run(_variant(cfg, m, seed, out / "runs" / m / f"seed{seed}"), scored)


def _method_entry(m: str, runs: dict[str, list[dict]], names: list[str], scored: list[str], joint_time) -> dict:
    """compare.json's entry of method ``m``: per-task and average CIs over seeds, telemetry means, paired
    differences vs joint, curves and time to joint's accuracy."""
    per_task = {n: _ci95([r["metrics"][n] for r in runs[m]]) for n in names}
    avg = _ci95([_avg(r["metrics"], scored) for r in runs[m]])
    entry = {
        "per_task": {n: {"mean": v[0], "ci95": v[1]} for n, v in per_task.items()},
        "average": {"mean": avg[0], "ci95": avg[1]},
        "validation_average": _mean([_avg(r["validation"], scored) for r in runs[m] if r["validation"]]),
        **{
            k: _mean([r[k] for r in runs[m]])
            for k in ("conflict_rate", "change", "cos_joint", "negative_gain", "seconds_per_step")
        },
    }
    if geometry := mean_geometry([r.get("geometry") for r in runs[m]]):
        entry["geometry"] = geometry
    if joint_time and not math.isnan(entry["seconds_per_step"]):
        entry["time_vs_joint"] = entry["seconds_per_step"] / joint_time
    if "joint" in runs and m != "joint":
        diffs = [_avg(a["metrics"], scored) - _avg(b["metrics"], scored) for a, b in zip(runs[m], runs["joint"])]
        mean, half = _ci95(diffs)
        entry["paired_vs_joint"] = {
            "per_seed": diffs,
            "mean": mean,
            "ci95": half,
            "positive": sum(d > 0 for d in diffs),
        }
    curves = [r.get("curve") for r in runs[m]]
    if m != "single" and all(curves):
        entry["curve"] = _mean_curve(curves)
        if "joint" in runs and all(r.get("curve") for r in runs["joint"]):
            entry["time_to_target"] = _time_to_target(runs[m], runs["joint"])
    return entry


def _gap_recovery(entries: dict[str, dict], m: str, names: list[str]) -> dict[str, float]:
    """(method - joint) / (single - joint), per task and on the average: the share of single-task training's gap
    a method closes (nan where the gap is 0)."""
    s, j, e = entries["single"], entries["joint"], entries[m]

    def share(method: float, single: float, joint: float) -> float:
        gap = single - joint
        return (method - joint) / gap if abs(gap) > 1e-12 else float("nan")

    rec = {n: share(e["per_task"][n]["mean"], s["per_task"][n]["mean"], j["per_task"][n]["mean"]) for n in names}
    rec["average"] = share(e["average"]["mean"], s["average"]["mean"], j["average"]["mean"])
    return rec


def _mean_curve(curves: list) -> list[tuple[int, float]]:
    """The validation-average curve averaged over seeds, at the steps every seed evaluated."""
    common = set.intersection(*[{s for s, _ in c} for c in curves])
    return [(s, sum(dict(c)[s] for c in curves) / len(curves)) for s in sorted(common)]


def _time_to_target(method_runs: list[dict], joint_runs: list[dict]) -> dict:
    """Steps and seconds to joint's best validation average, per seed and paired with joint (time_to_accuracy.py)."""
    spp = median([r["seconds_per_step"] for r in method_runs])
    tta = time_to_target(
        [r["curve"] for r in method_runs],
        [r["curve"] for r in joint_runs],
        spp,
        median([r["seconds_per_step"] for r in joint_runs]),
    )
    for key in ("paired_steps", "paired_seconds"):
        values = tta[key]
        mean, half = _ci95(values) if values else (None, None)
        tta[f"{key}_mean"], tta[f"{key}_ci95"] = mean, half
    reached = [s for s in tta["steps"] if s is not None]
    tta["steps_mean"] = sum(reached) / len(reached) if reached else None
    tta["speedup_median"] = median(tta["speedup"]) if tta["speedup"] else None
    tta["seconds_per_step"] = spp
    return tta
