"""What a checkpoint holds after its step's optimizer update, read independently of the trainer's loading code:
every trained parameter's weight and AdamW moments keyed by name (``A.model.layers.0...``), and the EMA reference's
weights (``reward.baseline=ema``, keyed by the interpreter model's own names), for unsharded (accelerate's files) and
sharded (torch distributed checkpoint) checkpoints alike. Resume tests compare these
with the uninterrupted run's, so a dropped or misassigned optimizer state, or a wrong LR step, shows."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from thinkrl.config import load_config
from thinkrl.distributed.checkpoint import container, is_sharded_checkpoint
from thinkrl.models.roles import build_roles
from thinkrl.rl.learner import build_optimizer

MOMENTS = ("exp_avg", "exp_avg_sq")


def _parameter_order(run: Path) -> list[str]:
    """Names of the optimizer's parameters in its index order, from the recipe the run recorded."""
    cfg = load_config(run / "config.yaml", [])
    roles = build_roles(cfg)
    optimizer, _ = build_optimizer(cfg, roles)
    names = {id(p): n for n, p in container(roles).named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]], [*roles.models, "head"]


def _unsharded(ckpt: Path) -> dict[str, torch.Tensor]:
    order, modules = _parameter_order(ckpt.parent)
    files = ["model.safetensors", *(f"model_{i}.safetensors" for i in range(1, len(modules)))]
    weights = {f"{m}.{k}": v for m, f in zip(modules, files) for k, v in load_file(ckpt / f).items()}
    optim = torch.load(ckpt / "optimizer.bin", map_location="cpu", weights_only=True)
    out = {f"weight:{name}": weights[name] for name in order}
    for index, state in optim["state"].items():
        out.update({f"{m}:{order[index]}": state[m] for m in MOMENTS})
    out["lr"] = torch.tensor([g["lr"] for g in optim["param_groups"]], dtype=torch.float64)
    for custom in sorted(ckpt.glob("custom_checkpoint_*.pkl")):  # accelerate's registered objects: the EMA's
        state = torch.load(custom, map_location="cpu", weights_only=False)
        if isinstance(state, dict) and "decay" in state and state.get("weights") is not None:
            out.update({f"ema:{name}": value for name, value in state["weights"].items()})
    return out


def _sharded(ckpt: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        whole = Path(tmp) / "whole.pt"
        dcp_to_torch_save(ckpt / "sharded", whole)  # one process, no process group: DCP's own offline reader
        saved = torch.load(whole, map_location="cpu", weights_only=False)
    order, _ = _parameter_order(ckpt.parent)
    out = {f"weight:{name}": saved["model"][name] for name in order}
    for name in order:
        out.update({f"{m}:{name}": saved["optim"]["state"][name][m] for m in MOMENTS})
    out["lr"] = torch.tensor([g["lr"] for g in saved["optim"]["param_groups"]], dtype=torch.float64)
    out.update({f"ema:{name}": value for name, value in saved.get("ema", {}).items()})
    return out


def trained_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """``weight:<name>``, ``exp_avg:<name>``, ``exp_avg_sq:<name>`` per trained parameter, ``lr`` per group, and
    ``ema:<name>`` per EMA weight when the run keeps an EMA reference."""
    ckpt = Path(ckpt)
    return _sharded(ckpt) if is_sharded_checkpoint(ckpt) else _unsharded(ckpt)


def assert_same_state(got: Path, want: Path, exact: bool = False, outliers: float = 1e-4) -> None:
    """``got``'s weights, moments and learning rates equal ``want``'s: bitwise when ``exact``, else within the float
    noise of another reduction order. Adam's normalisation turns a ~1e-7 gradient difference into up to lr where a
    gradient is ~0, so a handful of elements (at most the share ``outliers``) may differ by a fraction of lr; every
    mean stays at noise level. EMA weights are compared as weights when ``want`` has them (``got`` must too)."""
    a, b = trained_state(got), trained_state(want)
    ema = any(k.startswith("ema:") for k in b)
    if not ema:  # a run with an EMA reference against one without: the rest must still agree
        a = {k: v for k, v in a.items() if not k.startswith("ema:")}
    assert a.keys() == b.keys()
    assert torch.equal(a["lr"], b["lr"]), f"learning rates {a['lr'].tolist()} != {b['lr'].tolist()}"
    for kind in ("weight", *MOMENTS, *(("ema",) if ema else ())):
        keys = [k for k in a if k.startswith(f"{kind}:")]
        assert keys, kind
        if exact:
            differ = [k for k in keys if not torch.equal(a[k], b[k])]
            assert not differ, f"{len(differ)} of {len(keys)} {kind} tensors differ, first {differ[0]}"
            continue
        diffs = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in keys])
        scale = torch.cat([b[k].float().abs().flatten() for k in keys]).mean()
        assert float(diffs.mean()) <= 1e-5 * float(scale) + 1e-12, f"{kind}: mean |diff| {float(diffs.mean()):.3g}"
        if kind in ("weight", "ema"):
            assert float((diffs > 1e-5).float().mean()) < outliers, kind
            assert float(diffs.max()) <= 1e-3, kind
