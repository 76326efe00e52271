"""Command line: ``thinkrl train|eval|prompts|coconut|export|serve|sweep|aggregate ...`` (``--help`` on each).

User errors (config, data, model paths, NaN loss) print one line ``thinkrl: error: ...`` and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from thinkrl.errors import ThinkRLError

# A sharded run's process group outlives destroy_process_group: torch's DTensor caches keep its device mesh, so its
# gloo threads are still running when the interpreter finalizes, and their teardown there can abort the process
# after all work is done ("terminate called without an active exception", SIGABRT: a failed launch). ``run`` then
# ends the process once everything is written and flushed, without that finalization.
_HARD_EXIT = False


def _train(args: argparse.Namespace) -> int:
    from thinkrl.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:  # the resolved recipe and the folder decision; nothing is built or written
        from thinkrl.run.recipe import describe_start

        print(describe(cfg))
        print(describe_start(cfg, args.overwrite))
        return 0
    from thinkrl.run.trainer import Trainer

    trainer = Trainer(cfg, overwrite=args.overwrite)
    try:
        result = trainer.train()
    finally:
        trainer.close()
    global _HARD_EXIT
    _HARD_EXIT = trainer.sharded
    init, final = result["initial_eval"], result["final_eval"]
    print(
        f"reward_mean {init['reward_mean']:.4f} -> {final['reward_mean']:.4f}; "
        f"nll_null - nll_thought {init['nll_null'] - init['nll_thought']:.4f} -> "
        f"{final['nll_null'] - final['nll_thought']:.4f}; "
        f"results in {cfg.trainer.output_dir}"
    )
    return 0


def describe(cfg) -> str:
    """The recipe a dry run resolved, in one line: models, data, thoughts, steps."""
    groups = ", ".join(f"{g}={cfg.model.spec(g).path}" for g in dict.fromkeys(cfg.model.weight_groups))
    return (
        f"recipe: models {groups} (roles base/reasoner/interpreter = {cfg.model.weight_groups}), data "
        f"{cfg.data.source}, {cfg.rollout.num_thoughts} thoughts of <= {cfg.rollout.max_thought_len} tokens "
        f"({cfg.rollout.backend}), {cfg.trainer.max_steps} steps, seed {cfg.trainer.seed}"
    )


def add_overwrite(parser: argparse.ArgumentParser, writes: str) -> None:
    """``--overwrite``: write into a folder holding other files, replacing only ``writes`` (thinkrl.output_folder)."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=f"write into a folder holding files thinkrl did not write: replaces only {writes}, keeps the rest",
    )


def add_dry_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="resolve the recipe and the output folder decision, print them and stop (exit 2: it would be refused)",
    )


def add_config_arguments(parser: argparse.ArgumentParser, example: str) -> None:
    """``--config PATH`` and dotted ``key=value`` overrides, shared by every command that takes a recipe."""
    parser.add_argument("--config", default=None, help=f"YAML recipe (e.g. {example})")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.max_steps=10")


def _add_train(sub) -> None:
    train = sub.add_parser("train", help="RL-train a reasoner/interpreter pair")
    add_config_arguments(train, "configs/default.yaml")
    add_overwrite(train, "the files a run writes")
    add_dry_run(train)
    train.set_defaults(func=_train)


def _lazy(module: str):
    """A registrar that imports ``module`` (which defines ``add_parser(subparsers)``) only when the CLI starts."""

    def add(sub) -> None:
        import importlib

        importlib.import_module(module).add_parser(sub)

    return add


# Each entry adds one or more subcommands.
COMMANDS = [
    _add_train,
    _lazy("thinkrl.eval.cli"),
    _lazy("thinkrl.coconut.cli"),
    _lazy("thinkrl.export"),
    _lazy("thinkrl.serve"),
    _lazy("thinkrl.study.sweep"),
    _lazy("thinkrl.plan"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thinkrl", description="Token-level thought RL for language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse takes one run of positionals: overrides written after options (``compare A B --task x k=v``) land here.
    stray = [a for a in extra if "=" not in a or a.startswith("-")]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except ThinkRLError as exc:
        print(f"thinkrl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("thinkrl: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130


def run() -> None:
    """The ``thinkrl`` command and ``python -m thinkrl``: ``main``, then exit (see ``_HARD_EXIT``)."""
    code = main()
    if _HARD_EXIT:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
