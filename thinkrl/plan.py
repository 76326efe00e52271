"""``thinkrl plan``: per-GPU memory, per-step tokens and FLOPs of a recipe, and whether it fits, before anything is
built (the formulas: ``thinkrl/run/memory_plan.py``).

    thinkrl plan --config configs/quiet_star/mistral-7b_gpu.yaml --gpus 8 --gpu-memory 80 \
        --model-config configs/models/mistral-7b.json
"""

from __future__ import annotations

import argparse
import json


def _plan(args: argparse.Namespace) -> int:
    from thinkrl.config import load_config
    from thinkrl.run.memory_plan import parse_model_configs, plan, report, resolve_archs

    cfg = load_config(args.config, args.overrides)
    archs = resolve_archs(cfg, parse_model_configs(args.model_config))
    result = plan(
        cfg,
        archs,
        gpus=args.gpus,
        gpu_memory_gb=args.gpu_memory,
        mixed_precision=args.mixed_precision,
        device=args.device,
        reserve_gb=args.reserve,
        recipe=args.config or "defaults",
    )
    print(json.dumps(result.to_json(), indent=1) if args.json else report(result))
    return 0


def add_parser(sub) -> None:
    from thinkrl.cli import add_config_arguments

    p = sub.add_parser(
        "plan", help="per-GPU memory, tokens and FLOPs of a recipe, and whether it fits (builds nothing)"
    )
    add_config_arguments(p, "configs/gsm8k/qwen2.5-0.5b_gpu.yaml")
    p.add_argument("--gpus", type=int, default=1, help="processes, one GPU each (the accelerate launch's)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB of memory per GPU")
    p.add_argument(
        "--model-config",
        action="append",
        default=[],
        metavar="[GROUP=]PATH",
        help="a config.json for every weight group (or GROUP=PATH for one), e.g. configs/models/mistral-7b.json for a "
        "hub model that is not downloaded",
    )
    p.add_argument(
        "--mixed-precision", choices=("no", "bf16"), default="no", help="the accelerate launch's mixed_precision"
    )
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: no vLLM share, per-tensor AdamW")
    p.add_argument(
        "--reserve", type=float, default=None, help="GiB kept for the CUDA context and allocator (default 1; cpu 0)"
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--dry-run", action="store_true", help="the same: plan builds and writes nothing")
    p.set_defaults(func=_plan)
