"""Compute accounting: the tokens each weight group's model processed in each phase of training, and their FLOPs.

What is counted. A forward pre-hook on each weight group's model counts the token slots of every call: the size of
``input_ids`` (or of ``inputs_embeds`` without its last axis), padding included, since the hardware computes it.
A prefix kept in a KV cache is counted once, by the forward that computed it; continuations on the cache count only
their own tokens (``shared_prefix``, ``parallel_passes``: the window read once, then each pass's rows × slots ×
tokens). Tokens are attributed to the trainer phase in force (``Trainer._timed``: rollout, score_and_loss, lm_warmup,
eval, ...) and to the weight group, which plays one or more roles (``ComputeCounter.group_roles``). A forward run
under ``torch.is_grad_enabled()`` by a model with a trainable parameter is also counted as a *backward token*: its
backward runs in the backward phase (the LM warm-up's in its own loop). A vLLM engine's work is reported by the actor
(prompt tokens its prefix cache did not serve, once per request, plus generated tokens) and counted as rollout
forwards of the reasoner's group.

FLOPs (Kaplan et al. 2020 §2.1; Chinchilla's C ≈ 6·N·D), with N = the model's *non-embedding* parameters (every
parameter except the input embedding and the output LM head, LoRA adapters included):
  forward   2·N per token
  backward  2·N (gradients of the activations) + 2·N_trainable (of the weights) per backward token — 4·N when the
            whole model trains, so forward + backward = the usual 6·N; a LoRA model costs about 2·N.
Not counted: the embedding lookup and the LM heads (including the chunked log-prob heads of the losses), the mixing
head, attention's O(L²) score and value products (2·n_layer·L·d per token at context L), the recomputation of
gradient checkpointing (model FLOPs, not hardware FLOPs), the optimizer and weight syncs. ``flops_total`` is the
training compute: every phase but ``eval`` (held-out evaluation depends on its cadence, not on training).

Under several processes each counts its own forwards and ``ComputeCounter.flush`` sums them across processes, so
every process holds the global totals (and stops at the same step under ``trainer.max_flops``).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from thinkrl.errors import ConfigError

PHASES = ("rollout", "score_and_loss", "lm_warmup", "eval", "sync", "optimizer", "backward", "save", "other")
NOT_TRAINING = ("eval",)  # phases whose FLOPs are not training compute


# ---------------------------------------------------------------- pure maths
def forward_flops(tokens: int, params: int) -> int:
    """2·N FLOPs per token (a multiply and an add per non-embedding weight)."""
    return 2 * params * tokens


def backward_flops(tokens: int, params: int, trainable: int) -> int:
    """2·N for the activation gradients + 2·N_trainable for the weight gradients, per backward token."""
    return (2 * params + 2 * trainable) * tokens


def step_flops(tokens: dict[str, dict[str, int]], backward: dict[str, int], sizes: dict[str, dict]) -> dict[str, int]:
    """FLOPs by phase: ``tokens`` {group: {phase: forward tokens}}, ``backward`` {group: backward tokens}, ``sizes``
    {group: {"params": N, "trainable": N_trainable}} → {phase: FLOPs}, the backward under ``backward``."""
    flops: dict[str, int] = {}
    for group, by_phase in tokens.items():
        for phase, n in by_phase.items():
            flops[phase] = flops.get(phase, 0) + forward_flops(n, sizes[group]["params"])
    for group, n in backward.items():
        flops["backward"] = flops.get("backward", 0) + backward_flops(
            n, sizes[group]["params"], sizes[group]["trainable"]
        )
    return flops


def training_flops(flops_by_phase: dict[str, int]) -> int:
    return sum(v for phase, v in flops_by_phase.items() if phase not in NOT_TRAINING)


def non_embedding_params(model: nn.Module) -> tuple[int, int]:
    """(N, N_trainable): parameters of ``model`` outside its input embedding and output LM head."""
    embeddings = set()
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            embeddings |= {id(p) for p in module.parameters()}
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in embeddings or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()  # a DTensor (FSDP2) reports its global size
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable


def tokens_of_call(args: tuple, kwargs: dict) -> int:
    """Token slots of one model call: ``input_ids`` (..., S) or ``inputs_embeds`` (..., S, d)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is not None:
        return ids.numel()
    embeds = kwargs.get("inputs_embeds")
    return embeds.shape[:-1].numel() if embeds is not None else 0


# ---------------------------------------------------------------- the counter
class ComputeCounter:
    """Counts tokens per (group, phase) through forward pre-hooks on ``models`` (weight group → model).

    ``role_group`` (role → group) names the roles each group plays. Counts accumulate until ``flush``, which sums
    them across processes and returns them; ``totals`` (a plain dict, saved in checkpoints) keeps the run's sums."""

    def __init__(self, models: dict[str, nn.Module], role_group: dict[str, str]):
        self.groups = list(models)
        self.group_roles = {g: [r for r, rg in role_group.items() if rg == g] for g in self.groups}
        self.sizes = {}
        self._trains = {}
        for group, model in models.items():
            params, trainable = non_embedding_params(model)
            self.sizes[group] = {"params": params, "trainable": trainable}
            self._trains[group] = any(p.requires_grad for p in model.parameters())
        self.phase = "other"
        self._zero()
        self._handles = [
            model.register_forward_pre_hook(self._hook(group), with_kwargs=True) for group, model in models.items()
        ]

    def _zero(self) -> None:
        self.forward = {g: dict.fromkeys(PHASES, 0) for g in self.groups}
        self.backward = dict.fromkeys(self.groups, 0)

    def _hook(self, group: str):
        def count(module, args, kwargs):
            self.add(group, tokens_of_call(args, kwargs), grad=torch.is_grad_enabled() and self._trains[group])

        return count

    def add(self, group: str, tokens: int, grad: bool = False) -> None:
        """``tokens`` forwarded by ``group``'s model in the current phase (also backward tokens when ``grad``)."""
        self.forward[group][self.phase] += tokens
        if grad:
            self.backward[group] += tokens

    @contextmanager
    def in_phase(self, phase: str):
        previous, self.phase = self.phase, phase if phase in PHASES else "other"
        try:
            yield
        finally:
            self.phase = previous

    def watch(self, group: str, model: nn.Module) -> None:
        """Count ``model``'s forwards as ``group``'s too (a copy of that group's model made after this counter, such
        as the sharded EMA reference; a ``deepcopy`` of a counted model inherits the hook instead)."""
        self._handles.append(model.register_forward_pre_hook(self._hook(group), with_kwargs=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def flush(self, totals: dict, reduce=None) -> dict:
        """Counts since the last flush, summed over processes by ``reduce`` (an int64 vector → its sum over
        processes; None with one process), added into ``totals`` (updated in place). Returns the interval's metrics:
        ``compute/tokens/<group>/<phase>`` (forward tokens, non-zero ones), ``compute/tokens/<group>/backward``,
        ``compute/flops/<phase>``, ``compute/flops`` (training FLOPs) and ``compute/flops_total`` (cumulative)."""
        vector = [self.forward[g][p] for g in self.groups for p in PHASES] + [self.backward[g] for g in self.groups]
        self._zero()
        if reduce is not None:
            vector = [int(v) for v in reduce(torch.tensor(vector, dtype=torch.int64)).tolist()]
        it = iter(vector)
        forward = {g: {p: next(it) for p in PHASES} for g in self.groups}
        backward = {g: next(it) for g in self.groups}
        forward = {g: {p: n for p, n in by_phase.items() if n} for g, by_phase in forward.items()}
        backward = {g: n for g, n in backward.items() if n}
        flops = step_flops(forward, backward, self.sizes)
        add_into(totals, forward, backward, flops)
        metrics: dict[str, float | int] = {}
        for group, by_phase in forward.items():
            metrics.update({f"compute/tokens/{group}/{phase}": n for phase, n in by_phase.items()})
        metrics.update({f"compute/tokens/{group}/backward": n for group, n in backward.items()})
        metrics.update({f"compute/flops/{phase}": float(v) for phase, v in flops.items()})
        metrics["compute/flops"] = float(training_flops(flops))
        metrics["compute/flops_total"] = float(totals["flops_total"])
        return metrics

    def describe(self) -> dict:
        """Per group: the roles it plays and its parameter counts (for summary.json)."""
        return {g: {"roles": self.group_roles[g], **self.sizes[g]} for g in self.groups}


def add_into(totals: dict, forward: dict, backward: dict, flops: dict) -> None:
    """Accumulate one interval into ``totals`` = {tokens: {group: {phase: n}}, backward_tokens: {group: n},
    flops: {phase: n}, flops_total: n} (plain ints: JSON in trainer_state.json, exact at any size)."""
    tokens = totals.setdefault("tokens", {})
    for group, by_phase in forward.items():
        for phase, n in by_phase.items():
            tokens.setdefault(group, {})[phase] = tokens.get(group, {}).get(phase, 0) + n
    back = totals.setdefault("backward_tokens", {})
    for group, n in backward.items():
        back[group] = back.get(group, 0) + n
    by_phase = totals.setdefault("flops", {})
    for phase, n in flops.items():
        by_phase[phase] = by_phase.get(phase, 0) + n
    totals["flops_total"] = totals.get("flops_total", 0) + training_flops(flops)


def merge_metrics(into: dict, more: dict) -> dict:
    """Add a later interval's compute metrics into ``into`` (counts add up; the cumulative total is replaced)."""
    for key, value in more.items():
        into[key] = value if key == "compute/flops_total" else into.get(key, 0) + value
    return into


# ---------------------------------------------------------------- budgets
def run_flops_total(folder: str | Path) -> float | None:
    """The training FLOPs a finished run recorded in its summary.json (None when it has none yet)."""
    summary = Path(folder) / "summary.json"
    if not summary.is_file():
        return None
    total = (json.loads(summary.read_text(encoding="utf-8")).get("compute") or {}).get("flops_total")
    return float(total) if total is not None else None


def flops_budget(max_flops: float, compute_match: str) -> float:
    """``trainer.max_flops``, or the total of the run ``trainer.compute_match`` names; 0 = no budget."""
    if not compute_match:
        return float(max_flops)
    total = run_flops_total(compute_match)
    if total is None:
        raise ConfigError(
            f"trainer.compute_match={compute_match} has no summary.json with a compute total; finish that run "
            "first (runs written before compute accounting have none: give trainer.max_flops instead)"
        )
    return total


def run_steps(folder: str | Path) -> int:
    """The steps a finished run recorded in its summary.json (0 when it has none)."""
    summary = Path(folder) / "summary.json"
    return int(json.loads(summary.read_text(encoding="utf-8")).get("steps") or 0) if summary.is_file() else 0


def matched_interval(every: int, budget: float, matched_steps: int) -> float:
    """FLOPs between a compute-matched run's checkpoints (or evaluations): as many as the matched run had over the
    same ``budget`` in its ``matched_steps``, i.e. ``every`` of its steps' worth. A no-thought LM step costs a
    fraction of a thought step, so a plain ``save_every`` would write a checkpoint every few seconds (73 for study
    (c)'s 219-step baseline). 0 when ``every`` is 0 (only at the end) or there is no matched run."""
    return budget * every / matched_steps if every and budget and matched_steps else 0.0


def crossed(before: float, after: float, interval: float) -> bool:
    """A step that took the running total from ``before`` to ``after`` passed a multiple of ``interval``."""
    return interval > 0 and int(after // interval) > int(before // interval)
