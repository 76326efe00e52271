"""``thinkrl eval`` and ``thinkrl prompts list|show|compare``."""

from __future__ import annotations

import argparse
from pathlib import Path

from thinkrl.cli import add_config_arguments, add_dry_run, add_overwrite


def _eval_options(args: argparse.Namespace, output: str) -> dict:
    return {
        "task": args.task,
        "model": args.model or args.config,
        "thoughts": args.thoughts,
        "limit": args.limit,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "generate": not args.no_generate,
        "stop": args.stop,
        "output_dir": output,
        "overwrite": args.overwrite,
    }


def _overrides(args: argparse.Namespace) -> list[str]:
    extra = [f"rollout.backend={args.backend}"] if args.backend else []
    if getattr(args, "vllm_url", None):  # a running server samples and generates; the evaluated weights go to it
        extra += ["rollout.backend=vllm", "rollout.vllm_mode=server", f"rollout.vllm_urls=[{args.vllm_url}]"]
    if args.text_file:
        extra += ["data.source=text", f"data.train_file={args.text_file}", f"data.eval_file={args.text_file}"]
        extra += [] if args.positions == "task" else [f"data.positions={args.positions}"]
    return [*extra, *args.overrides]


def _check_text_file(args: argparse.Namespace, cfg) -> None:
    """--text-file names a file that exists (said in terms of the flag the user passed, not data.train_file)."""
    from thinkrl.data.sources import resolve_data_file
    from thinkrl.errors import ConfigError

    if args.text_file and not resolve_data_file(cfg.data, args.text_file).is_file():
        where = cfg.data.resolved_data_dir()
        raise ConfigError(
            f"--text-file {args.text_file} does not exist (looked for {resolve_data_file(cfg.data, args.text_file)}); "
            f"give a path to a text file{f' or a file under {where}' if where else ''}"
        )


def _default_output(args, what: str) -> str:
    name = Path(str(args.model or args.config)).name.replace("/", "_")
    return args.output or str(Path("runs") / what / f"{args.task}-{name}-n{args.limit or 'all'}-s{args.seed}")


def _eval(args: argparse.Namespace) -> int:
    from thinkrl.eval.report import markdown_table
    from thinkrl.eval.runner import EvalOptions, Evaluator
    from thinkrl.eval.setup import load_setup

    opts = EvalOptions(**_eval_options(args, _default_output(args, "eval")))  # validates before loading models
    if args.dry_run:
        from thinkrl.config import load_config
        from thinkrl.eval.runner import folder_decision
        from thinkrl.eval.setup import describe_model

        print(describe_model(args.model, args.config))
        if not args.model:
            load_config(args.config, _overrides(args))  # unknown keys and bad values fail here
        print(folder_decision(opts).describe())
        return 0
    setup = load_setup(args.model, args.config, _overrides(args))
    _check_text_file(args, setup.cfg)
    results = Evaluator(opts, setup).run()
    print(markdown_table(results))
    print(f"results in {opts.output_dir}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from thinkrl.eval.compare import check_templates, compare

    check_templates(args.templates)
    opts = _eval_options(args, _default_output(args, "compare"))
    if args.dry_run:
        from thinkrl.eval.compare import folder_decision
        from thinkrl.eval.setup import describe_model

        print(describe_model(args.model, args.config))
        print(folder_decision(opts["output_dir"], args.templates, args.overwrite).describe())
        return 0
    print(compare(args.templates, opts, args.model, args.config, _overrides(args))["table"])
    print(f"results in {opts['output_dir']}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from thinkrl.prompts import known_templates

    print("\n".join(known_templates()))
    return 0


def _show(args: argparse.Namespace) -> int:
    from thinkrl.prompts import load_template

    print(load_template(args.name))
    return 0


def _add_eval_arguments(p: argparse.ArgumentParser, thoughts: str) -> None:
    p.add_argument("--model", help="run folder, checkpoint-<step>, HF folder, hub id, or smollm2-135m-instruct")
    p.add_argument("--task", default="gsm8k", help="gsm8k | csqa | text (with --text-file or a text recipe)")
    p.add_argument("--thoughts", default=thoughts, help="comma list of none, null, sampled:K")
    p.add_argument("--limit", type=int, default=0, help="evaluate N items drawn by --seed (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="chooses the slice and every item's thought seed")
    p.add_argument("--backend", choices=("hf", "vllm"), help="rollout/generation backend (default: the recipe's)")
    p.add_argument(
        "--vllm-url",
        default="",
        help="sample from a running vLLM server (thinkrl serve): its URL, e.g. http://host:8000",
    )
    p.add_argument("--batch-size", type=int, default=8, help="items per batch")
    p.add_argument("--max-new-tokens", type=int, default=0, help="generated answer tokens (0 = task default)")
    p.add_argument("--no-generate", action="store_true", help="skip greedy generation (likelihood scores only)")
    p.add_argument("--stop", default="", help="comma list of generation stop strings, e.g. '\\n\\n' (default: task's)")
    p.add_argument("--text-file", help="--task text: held-out text file (relative to data.data_dir or a path)")
    p.add_argument("--positions", default="every_k", help="--task text: every_k | random thought positions")
    p.add_argument("--output", help="output folder (rerun the same command to resume)")
    add_overwrite(p, "an evaluation's own files")
    add_dry_run(p)
    add_config_arguments(p, "configs/eval/smollm2_cpu.yaml")


def add_parser(sub) -> None:
    ev = sub.add_parser("eval", help="offline evaluation with and without thoughts (GSM8K, CSQA, text)")
    _add_eval_arguments(ev, "none,null,sampled:4")
    ev.set_defaults(func=_eval)

    prompts = sub.add_parser("prompts", help="list, show and compare prompt templates")
    psub = prompts.add_subparsers(dest="prompts_command", required=True)
    psub.add_parser("list", help="every template name").set_defaults(func=_list)
    show = psub.add_parser("show", help="a template's text with its includes expanded")
    show.add_argument("name")
    show.set_defaults(func=_show)
    cmp_ = psub.add_parser("compare", help="reasoner templates side by side on the same items")
    cmp_.add_argument("templates", nargs="+", help="reasoner template names, e.g. thinking/plain thinking/system")
    _add_eval_arguments(cmp_, "null,sampled:4")
    cmp_.set_defaults(func=_compare)
