"""The no-thought baseline (``learner.objective=lm``): plain continued LM training on the thought run's data.

Each step takes the same positions as a thought run with the same seed (the same stream, batches and process
slices) and trains the base and interpreter models — each distinct, non-frozen weight group once — with the NLL of
the positions' target tokens y teacher-forced after the context x, no thought markers, no sampling, no reward, no
mixing head:

    loss = Σ_models mean_{target tokens} −log p_model(y_j | x, y_<j)

These are exactly the base's no-thought scores of the thought run (``Scores.logp_base``, the ``learner.base_weight``
term): per position the last ``data.interpreter_window`` context tokens then y (``shared_prefix``), or, with parallel
passes and the whole window visible, one causal read of each window whose state at t − 1 + j predicts y_j of the
slot at t (``window_scoring``). Run it against a thought run at equal training compute with
``trainer.compute_match=<thought run>`` (``thinkrl sweep --compute-matched-baseline`` does that per seed).

Why not ``rollout.num_thoughts=0``: that control still reads every target after the null thought's markers through
the mixing head, and spends a forward (and backward) on the null row; the baseline the thought run must beat at
equal compute is a language model that never saw a thought.
"""

from __future__ import annotations

import torch
from torch import nn

from thinkrl.data.windows import WindowBatch
from thinkrl.models import chunked_logps
from thinkrl.models.roles import RoleModels
from thinkrl.models.shared_prefix import forward_shared_prefix
from thinkrl.models.true_tokens import TrueTokenHead
from thinkrl.rl import core_algos


def lm_models(roles: RoleModels) -> dict[str, nn.Module]:
    """The distinct base/interpreter weight groups with a trainable parameter, base first: {role name: model}."""
    out: dict[str, nn.Module] = {}
    for role in ("base", "interpreter"):
        model = roles.model(role)
        if any(m is model for m in out.values()) or not any(p.requires_grad for p in model.parameters()):
            continue
        out[role] = model
    return out


def position_target_logps(
    model: nn.Module, windows: list[list[int]], targets: list[list[int]], pad_id: int, marker_ids: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: ``windows[i]`` (the context the model sees) then ``targets[i]``, teacher-forced; the thought
    markers get no probability (``TrueTokenHead``), as in the thought run's scores.

    Returns (log-probs of the targets (N, n), float32; mask (N, n) bool)."""
    n = max(len(y) for y in targets)
    suffixes = [[w[-1], *y[:-1]] for w, y in zip(windows, targets)]  # state j predicts y_j
    _, hidden, _ = forward_shared_prefix(model, [w[:-1] for w in windows], suffixes, pad_id, need_logits=False)
    device = hidden.device
    ids = torch.full((len(targets), n), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(targets), n), dtype=torch.bool, device=device)
    for i, y in enumerate(targets):
        ids[i, : len(y)], mask[i, : len(y)] = torch.tensor(y, device=device), True
    logp = chunked_logps.target_logps(TrueTokenHead(model.get_output_embeddings(), marker_ids), hidden[:, :n], ids)
    return logp, mask


def window_target_logps(
    model: nn.Module, batch: WindowBatch, marker_ids: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One causal read of each window (B, L); the state at t − 1 + j predicts y_j of the slot at context length t.

    Returns (log-probs (B, P, n), float32; mask (B, P, n) bool: real targets of valid slots)."""
    out = model(input_ids=batch.ids, use_cache=False, output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1]  # (B, L, d)
    n = batch.target_ids.shape[-1]
    index = ((batch.slot_len - 1)[..., None] + torch.arange(n, device=hidden.device)).clamp_max(hidden.shape[1] - 1)
    states = hidden.gather(1, index.flatten(1)[..., None].expand(-1, -1, hidden.shape[-1]))
    states = states.view(*index.shape, -1)  # (B, P, n, d)
    logp = chunked_logps.target_logps(
        TrueTokenHead(model.get_output_embeddings(), marker_ids), states, batch.target_ids
    )
    return logp, batch.target_mask & batch.valid[..., None]


def lm_loss(models: dict[str, nn.Module], nll_of) -> tuple[torch.Tensor, dict[str, float]]:
    """Σ over ``models`` of the mean target NLL; ``nll_of(model)`` → (log-probs, mask) of one batch.

    Returns (loss, stats: ``<role>_nll`` per model and ``loss``)."""
    loss, stats = None, {}
    for role, model in models.items():
        logp, mask = nll_of(model)
        nll = core_algos.nll_loss(logp.reshape(-1, 1, logp.shape[-1]), mask.reshape(-1, mask.shape[-1]))
        loss = nll if loss is None else loss + nll
        stats[f"{role}_nll"] = float(nll.detach())
    stats["loss"] = float(loss.detach())
    return loss, stats
