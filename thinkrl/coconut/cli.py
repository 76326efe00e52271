"""``thinkrl coconut train|eval --config PATH [key=value ...]`` (registered in ``thinkrl.cli.COMMANDS``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from thinkrl.coconut.config import load_coconut_config
    from thinkrl.coconut.trainer import CoconutTrainer

    cfg = load_coconut_config(args.config, args.overrides)
    if args.dry_run:
        from thinkrl.coconut.trainer import folder_decision

        folder = folder_decision(cfg, args.overwrite)
        print(f"recipe: {cfg.curriculum.mode}, model {cfg.model.path}, {cfg.trainer.num_epochs} epochs")
        print(folder.describe())
        return 0
    result = CoconutTrainer(cfg, overwrite=args.overwrite).train()
    for stage, r in sorted(result["stage_results"].items(), key=lambda kv: int(kv[0])):
        print(
            f"stage {stage}: accuracy {r['accuracy']:.3f}  cot_match {r['cot_match']:.3f}  "
            f"new_tokens {r['new_tokens']:.1f}  (valid, n={r['n']})"
        )
    print(f"results in {cfg.trainer.output_dir}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from thinkrl.coconut.config import load_coconut_config
    from thinkrl.coconut.curriculum import scheduled_stage
    from thinkrl.coconut.trainer import CoconutTrainer
    from thinkrl.errors import ConfigError
    from thinkrl.run.files import write_atomic

    cfg = load_coconut_config(args.config, args.overrides)
    trainer = CoconutTrainer(cfg)
    path = Path(cfg.eval.checkpoint) if cfg.eval.checkpoint else trainer.latest_checkpoint()
    if path is None:
        raise ConfigError(f"no checkpoint in {cfg.trainer.output_dir}; train first or set eval.checkpoint=PATH")
    trainer.load_checkpoint(path)
    last_epoch = max(trainer.state.epoch - 1, 0)
    stage = cfg.eval.stage if cfg.eval.stage >= 0 else scheduled_stage(last_epoch, cfg.curriculum)
    result = trainer.evaluate(cfg.eval.split, stage)
    result["checkpoint"] = str(path)
    out = Path(cfg.trainer.output_dir) / f"eval-{cfg.eval.split}-stage{stage}.json"
    write_atomic(out, json.dumps(result, indent=2))
    print(
        f"{cfg.curriculum.mode} stage {stage} on {cfg.eval.split} (n={result['n']}): accuracy "
        f"{result['accuracy']:.3f}  "
        f"cot_match {result['cot_match']:.3f}  new_tokens {result['new_tokens']:.1f}  → {out}"
    )
    return 0


def add_parser(sub) -> None:
    from thinkrl.cli import add_config_arguments, add_dry_run, add_overwrite

    coconut = sub.add_parser("coconut", help="Coconut baseline: continuous latent thoughts with a stage curriculum")
    actions = coconut.add_subparsers(dest="coconut_command", required=True)
    train = actions.add_parser("train", help="train with the stage curriculum (mode coconut | cot | no_cot | pause)")
    add_config_arguments(train, "configs/coconut/synthetic_cpu.yaml")
    add_overwrite(train, "the files a run writes")
    add_dry_run(train)
    train.set_defaults(func=_train)
    evaluate = actions.add_parser("eval", help="batched greedy evaluation of a checkpoint (eval.split, eval.stage)")
    add_config_arguments(evaluate, "configs/coconut/synthetic_cpu.yaml")
    evaluate.set_defaults(func=_eval)
