"""``thinkrl sweep``: one recipe over a grid and seeds, run after run, resumable; ``thinkrl aggregate``: a study of
finished run or evaluation folders.

    thinkrl sweep --config configs/default.yaml --seeds 0,1,2 --out runs/study-x \\
        reward.length_penalty=0,0.05 trainer.max_steps=40

An override whose value has top-level commas is an axis (``reward.length_penalty=0,0.05``; ``[A,B,C]`` is one value,
``[A,A,A],[A,B,C]`` two); one without is fixed for every run. Each grid point and seed gets its own run folder,
``<out>/<axis>=<value>/.../seed-<s>`` (an axis is named by the last part of its key unless two axes share it), and
runs one after another in this process, or as ``<launcher> -m thinkrl train ...`` subprocesses with ``--launcher``
(e.g. ``"accelerate launch --config_file configs/accelerate/cpu-2proc.yaml"``). A rerun skips finished runs
(summary.json at max_steps, same recipe) and resumes the others from their checkpoints; a run folder holding another
recipe stops the sweep before anything trains (``run.recipe``). At the end ``<out>`` gets ``study.json``,
``study.md`` and ``plots/`` (``thinkrl.study.aggregate``).

``--compute-matched-baseline`` adds, after each seed's thought run, the no-thought LM baseline of the same recipe and
seed (``learner.objective=lm``, ``lm_baseline``) in ``<point>/baseline/seed-<s>``, trained until it has used that
run's training FLOPs (``trainer.compute_match=<the thought run>``; its ``max_steps`` is only a cap). The baselines
form their own points (``<point>/baseline``), and each thought point gets ``matched_lm/nll_gain``: per seed, the
baseline's held-out ``nll_base`` minus the thought run's ``nll_thought`` (> 0: thoughts beat equal compute spent on
plain LM training).

    thinkrl aggregate runs/a runs/b runs/c --out runs/study-abc

reads run folders (summary.json) or ``thinkrl eval`` folders (results.json), forms points by recipe (every recorded
setting except the seed and what may change on resume), and writes the same study files.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from thinkrl import output_folder
from thinkrl.errors import ConfigError, ThinkRLError

RESERVED = ("trainer.output_dir", "trainer.seed")  # the sweep sets these per run
BASELINE_MAX_STEPS = 10**9  # a compute-matched baseline stops on its FLOP budget; this only caps its steps


@dataclass
class SweepRun:
    label: str  # the grid point: its folder under the study ("length_penalty=0.05"), "all" without axes
    seed: int
    folder: Path
    overrides: list[str]  # every dotted override of this run, output_dir and seed included
    matches: Path | None = None  # a compute-matched baseline: the thought run whose training FLOPs it spends


def split_values(text: str) -> list[str]:
    """Split on commas outside brackets, braces and quotes: ``0,0.05`` → two values, ``[A,B,C]`` → one."""
    values, depth, quote, current = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append("".join(current))
            current = []
            continue
        current.append(ch)
    return [*values, "".join(current)]


def parse_grid(overrides: list[str]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(fixed overrides, axes as (key, values)) in the order given."""
    fixed, axes = [], []
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} is not key=value (e.g. reward.length_penalty=0,0.05)")
        key, value = override.split("=", 1)
        if key in RESERVED:
            raise ConfigError(f"thinkrl sweep sets {key} per run; use --out and --seeds instead")
        values = split_values(value)
        if len(values) == 1:
            fixed.append(override)
            continue
        if any(k == key for k, _ in axes):
            raise ConfigError(f"axis {key} is given twice; list all its values in one override")
        if len(set(values)) != len(values):
            raise ConfigError(f"axis {key} repeats a value: {value}")
        axes.append((key, values))
    return fixed, axes


def folder_value(value: str) -> str:
    """A value as it reads in a folder name: brackets, quotes and spaces dropped, '/' → '_'; '' → 'empty'."""
    cleaned = re.sub(r"[\[\]{}()'\" ]", "", value).replace("/", "_")
    return cleaned or "empty"


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r} is not a comma list of integers (e.g. 0,1,2)") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r} must list distinct integers (e.g. 0,1,2)")
    return seeds


def plan(
    overrides: list[str], seeds: list[int], out: Path, baseline: bool = False
) -> tuple[list[SweepRun], list[str], list]:
    """Every (grid point, seed) run in order (points in the order of the axes' values, seeds innermost); with
    ``baseline`` each thought run is followed by its compute-matched LM baseline."""
    fixed, axes = parse_grid(overrides)
    tails = [key.rsplit(".", 1)[-1] for key, _ in axes]
    names = [tail if tails.count(tail) == 1 else key for tail, (key, _) in zip(tails, axes)]
    runs, labels = [], set()
    for combo in itertools.product(*(values for _, values in axes)):
        label = "/".join(f"{name}={folder_value(v)}" for name, v in zip(names, combo)) or "all"
        if label in labels:
            raise ConfigError(f"two grid points would share the folder {label}; give the values distinct names")
        labels.add(label)
        point = [f"{key}={v}" for (key, _), v in zip(axes, combo)]
        for seed in seeds:
            folder = (out / label if axes else out) / f"seed-{seed}"
            runs.append(
                SweepRun(label, seed, folder, [*fixed, *point, f"trainer.seed={seed}", f"trainer.output_dir={folder}"])
            )
            if baseline:
                lm_folder = folder.parent / "baseline" / f"seed-{seed}"
                lm = [
                    "learner.objective=lm",
                    f"trainer.max_steps={BASELINE_MAX_STEPS}",
                    f"trainer.compute_match={folder}",
                    f"trainer.seed={seed}",
                    f"trainer.output_dir={lm_folder}",
                ]
                lm_label = "baseline" if label == "all" else f"{label}/baseline"
                runs.append(SweepRun(lm_label, seed, lm_folder, [*fixed, *point, *lm], matches=folder))
    return runs, fixed, axes


def run_status(cfg) -> str:
    """done (summary.json at max_steps, or stopped by a FLOP budget equal to today's), resume (from a checkpoint),
    restart (outputs but no checkpoint: starts again at step 0) or new. Raises the one-line ConfigError of
    ``run.recipe.check_run_folder`` when the folder holds another recipe."""
    from thinkrl.run.compute import run_flops_total
    from thinkrl.run.recipe import check_run_folder, held_outputs
    from thinkrl.run.state import find_checkpoints

    check_run_folder(cfg)
    tc = cfg.trainer
    folder = Path(tc.output_dir)
    summary_path = folder / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if summary.get("steps") == tc.max_steps:
            return "done"
        budget = run_flops_total(tc.compute_match) if tc.compute_match else tc.max_flops
        spent = (summary.get("compute") or {}).get("max_flops")
        if budget and summary.get("stopped_by") == "max_flops" and spent == budget:
            return "done"
    if find_checkpoints(folder):
        return "resume"
    return "restart" if held_outputs(folder) else "new"


def train_command(launcher: str, config: str | None, overrides: list[str]) -> list[str]:
    """``<launcher> -m thinkrl train [--config C] overrides...`` (launcher e.g. ``accelerate launch ...``)."""
    return [*shlex.split(launcher), "-m", "thinkrl", "train", *(["--config", config] if config else []), *overrides]


def _train(run: SweepRun, config: str | None, launcher: str | None) -> None:
    if launcher:
        cmd = train_command(launcher, config, run.overrides)
        done = subprocess.run(cmd, check=False)
        if done.returncode:
            raise ThinkRLError(
                f"run {run.folder} failed (exit code {done.returncode}: {shlex.join(cmd)}); fix it and rerun the "
                "sweep: finished runs are skipped, this one resumes"
            )
        return
    import gc

    from thinkrl.config import load_config
    from thinkrl.run.trainer import Trainer

    trainer = Trainer(load_config(config, run.overrides))
    try:
        trainer.train()
    finally:
        trainer.close()  # a vLLM engine per run would otherwise stay up until the sweep ends
    del trainer
    gc.collect()


def sweep(
    config: str | None,
    overrides: list[str],
    seeds: list[int],
    out: str | Path,
    launcher: str | None = None,
    dry_run: bool = False,
    level: float = 0.95,
    baseline: bool = False,
    overwrite: bool = False,
) -> dict | None:
    """Plan, check every run folder, train what is not done, then write the study; returns the study (None on a
    dry run, which only prints the plan). ``baseline``: add the compute-matched LM baselines (module docstring)."""
    from thinkrl.config import load_config
    from thinkrl.study.aggregate import aggregate, read_run, write_study

    out = Path(out)
    folder = output_folder.decide(out, "sweep", _is_sweep, overwrite)
    runs, fixed, axes = plan(overrides, seeds, out, baseline)
    if baseline and load_config(config, runs[0].overrides).learner.scheduler in ("linear", "cosine"):
        print(
            f"note: the compute-matched baselines stop on FLOPs with max_steps={BASELINE_MAX_STEPS} as a cap, so a "
            "linear/cosine learning-rate schedule (which decays over max_steps) stays near its peak there",
            flush=True,
        )
    statuses = [run_status(load_config(config, run.overrides)) for run in runs]  # every recipe valid, folders agree
    for i, (run, status) in enumerate(zip(runs, statuses), 1):
        print(f"[{i}/{len(runs)}] {run.folder.relative_to(out)}: {status}", flush=True)
    print(folder.describe(), flush=True)
    if dry_run:
        return None
    output_folder.claim(folder)
    for i, (run, status) in enumerate(zip(runs, statuses), 1):
        if run.matches is not None:  # its budget is the thought run's total, which may have changed just now
            status = run_status(load_config(config, run.overrides))
        if status != "done":
            print(f"[{i}/{len(runs)}] {run.folder.relative_to(out)}: training ({status})", flush=True)
            _train(run, config, launcher)
    points: dict[str, list] = {}
    results = {run.folder: read_run(run.folder) for run in runs}
    for run in runs:
        points.setdefault(run.label, []).append(results[run.folder])
    for run in runs:
        if run.matches is not None:
            add_matched_gain(results[run.matches], results[run.folder])
    study = aggregate(points, level)
    study["sweep"] = {
        "config": config,
        "fixed": fixed,
        "axes": dict(axes),
        "seeds": seeds,
        "launcher": launcher,
        "compute_matched_baseline": baseline,
    }
    notes = [
        f"recipe: `{config or '(defaults)'}` {' '.join(f'`{o}`' for o in fixed)}",
        "axes: " + ("; ".join(f"`{k}` = {', '.join(v)}" for k, v in axes) or "none"),
        f"seeds: {', '.join(map(str, seeds))}",
    ]
    if baseline:
        notes.append(
            "`<point>/baseline`: the no-thought LM baseline (`learner.objective=lm`) of each seed, trained to the "
            "thought run's training FLOPs; `matched_lm/nll_gain` = baseline `nll_base` − thought run `nll_thought`"
        )
    write_study(out, study, f"Study {out.name}", notes)
    print(f"study in {out}/study.md")
    return study


def add_matched_gain(thought, lm) -> None:
    """Into the thought run's result: ``matched_lm/nll_gain`` = its compute-matched baseline's held-out NLL with no
    thought (final ``nll_base``) minus its own after thoughts (final ``nll_thought``); > 0: thoughts win."""
    a, b = lm.metrics.get("final_eval/nll_base"), thought.metrics.get("final_eval/nll_thought")
    if a is not None and b is not None:
        thought.metrics["matched_lm/nll_gain"] = a - b


def _is_sweep(folder: Path) -> bool:
    """A study folder written before folders carried thinkrl's stamp: a study.json, or run folders of seeds."""
    return (
        (folder / "study.json").is_file()
        or any(folder.glob("seed-*/config.yaml"))
        or any(folder.glob("*/seed-*/config.yaml"))
    )


def aggregate_folders(folders: list[str], out: str | Path, level: float = 0.95, overwrite: bool = False) -> dict:
    from thinkrl.study.aggregate import aggregate, group_by_point, read_result, write_study

    decision = output_folder.decide(
        out, "aggregate", lambda f: (f / "study.json").is_file(), overwrite, accept=("sweep",)
    )

    seen = [Path(f).resolve() for f in folders]
    if len(set(seen)) != len(seen):
        raise ConfigError("a folder is given twice: each counts as one seed")
    points = group_by_point([read_result(f) for f in folders])
    output_folder.claim(decision)
    study = aggregate(points, level)
    notes = ["points: folders with the same recorded recipe (all but the seed and operational settings)"]
    write_study(out, study, f"Aggregate of {len(folders)} folders", notes)
    print(f"study in {Path(out)}/study.md")
    return study


# ---------------------------------------------------------------- command line


def _sweep(args: argparse.Namespace) -> int:
    sweep(
        args.config,
        args.overrides,
        parse_seeds(args.seeds),
        args.out,
        args.launcher,
        args.dry_run,
        args.level,
        args.compute_matched_baseline,
        args.overwrite,
    )
    return 0


def _aggregate(args: argparse.Namespace) -> int:
    aggregate_folders(args.folders, args.out, args.level, args.overwrite)
    return 0


def _level(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"--level must be in (0, 1), got {text}")
    return value


def add_parser(sub) -> None:
    from thinkrl.cli import add_overwrite

    sw = sub.add_parser("sweep", help="train one recipe over a grid of settings and seeds, then aggregate")
    sw.add_argument("--seeds", default="0", help="comma list of trainer.seed values (default 0)")
    sw.add_argument("--out", required=True, help="study folder: one run folder per grid point and seed inside")
    sw.add_argument(
        "--launcher",
        default=None,
        help="run each training as '<launcher> -m thinkrl train ...', e.g. 'accelerate launch --config_file X' "
        f"(default: in this process; '{Path(sys.executable).name}' gives one subprocess per run)",
    )
    sw.add_argument("--dry-run", action="store_true", help="print the runs and whether each is done, then stop")
    add_overwrite(sw, "the files a sweep writes")
    sw.add_argument(
        "--compute-matched-baseline",
        action="store_true",
        help="after each thought run, train the no-thought LM baseline (learner.objective=lm) of the same recipe and "
        "seed to the same training FLOPs, in <point>/baseline/seed-<s>; aggregated as its own point",
    )
    sw.add_argument("--level", type=_level, default=0.95, help="interval level across seeds (default 0.95)")
    sw.add_argument("--config", default=None, help="YAML recipe (e.g. configs/default.yaml)")
    sw.add_argument(
        "overrides", nargs="*", help="dotted overrides: key=v1,v2 is an axis of the grid, key=v is fixed for all runs"
    )
    sw.set_defaults(func=_sweep)

    ag = sub.add_parser("aggregate", help="aggregate finished run or eval folders across seeds into a study")
    ag.add_argument("folders", nargs="+", help="run folders (summary.json) or thinkrl eval folders (results.json)")
    ag.add_argument("--out", required=True, help="folder for study.json, study.md and plots/")
    ag.add_argument("--level", type=_level, default=0.95, help="interval level across seeds (default 0.95)")
    add_overwrite(ag, "study.json, study.md and plots/")
    ag.set_defaults(func=_aggregate)
