"""Scorer: teacher-forced log q(y | x, z) for the K thoughts and the null thought, and the base's log p0(y | x).

For each position the interpreter reads ``window(x) ⊕ <sot> z <eot> ⊕ y``. The window (the last
``data.interpreter_window`` context tokens, or all of them) is computed once per position and shared by
its K + 1 thoughts (and by the base row when base and interpreter are one model). The mixing head then
blends base and interpreter per target token. Differentiable when called under grad (the learner's
interpreter/base/head losses reuse this forward).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from thinkrl.models import chunked_logps
from thinkrl.models.roles import RoleModels
from thinkrl.models.shared_prefix import forward_shared_prefix, forward_two_level
from thinkrl.rollout.base import ThoughtBatch


@dataclass
class Scores:
    """Per-token log-probs of the targets. Row K of the thought axis is the null thought, unless it was not scored
    (``has_null`` False: training whose loss does not need it, ``rl.null_row``); then there are K rows."""

    logp: torch.Tensor  # (N, K+1, n) mixed prediction (the interpreter alone when head.form=none)
    logp_reward: torch.Tensor  # (N, K+1, n) the prediction rewards are computed from (reward.source)
    logp_base: torch.Tensor  # (N, n) base model, no thought, its own LM head
    weight: torch.Tensor  # (N, K+1, n) interpreter weight of the mixing head
    target_ids: torch.Tensor  # (N, n)
    target_mask: torch.Tensor  # (N, n) bool
    has_null: bool = True

    @property
    def num_thoughts(self) -> int:
        return self.logp.shape[1] - int(self.has_null)

    @property
    def logp_thoughts(self) -> torch.Tensor:
        return self.logp_reward[:, : self.num_thoughts]

    @property
    def logp_null(self) -> torch.Tensor:
        if not self.has_null:
            raise ValueError("the null thought was not scored (score with null=True)")
        return self.logp_reward[:, -1]


@dataclass
class Distributions:
    """Log-distributions over the vocabulary at each target position; thought axis as in ``Scores``."""

    logp: torch.Tensor  # (N, K+1, n, V) mixed prediction
    logp_interp: torch.Tensor | None  # (N, K+1, n, V) interpreter alone, when rewards come from it
    logp_base: torch.Tensor  # (N, n, V) base, no thought
    weight: torch.Tensor  # (N, K+1, n)
    target_ids: torch.Tensor  # (N, n)
    target_mask: torch.Tensor  # (N, n) bool

    def scores(self) -> Scores:
        """The log-probs of the targets themselves."""
        k1_targets = self.target_ids[:, None, :].expand(-1, self.logp.shape[1], -1)
        logp = _pick(self.logp, k1_targets)
        logp_reward = logp if self.logp_interp is None else _pick(self.logp_interp, k1_targets)
        return Scores(
            logp, logp_reward, _pick(self.logp_base, self.target_ids), self.weight, self.target_ids, self.target_mask
        )


def _gather_targets(hidden: torch.Tensor, starts: torch.Tensor, n: int) -> torch.Tensor:
    """hidden (B, S, d), starts (B,) → (B, n, d): the states at starts + j that predict y_j."""
    index = (starts[:, None] + torch.arange(n, device=hidden.device)).clamp_max(hidden.shape[1] - 1)
    return hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))


class Scorer:
    def __init__(self, roles: RoleModels, null_ids: list[int], interpreter_window: int, reward_source: str):
        self.roles = roles
        self.null_seq = [roles.sot_id, *null_ids, roles.eot_id]
        self.window = interpreter_window
        self.reward_source = reward_source
        self.pad_id = roles.tokenizer.pad_token_id

    def window_of(self, context: list[int]) -> list[int]:
        return context[-self.window :] if self.window else context

    def _pad_targets(self, targets: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask), both (M, longest target), padded on the right."""
        n = max(len(t) for t in targets)
        ids = torch.full((len(targets), n), self.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(targets), n), dtype=torch.bool, device=device)
        for i, t in enumerate(targets):
            ids[i, : len(t)], mask[i, : len(t)] = torch.tensor(t, device=device), True
        return ids, mask

    def _rows(self, contexts: list[list[int]], thoughts: ThoughtBatch, null: bool = True) -> tuple[list, list, bool]:
        """(windows, rows, base_in_batch): per position its K thoughts as the interpreter reads them, then the null
        thought (``null``), then an empty row for the base when base and interpreter are one model."""
        roles = self.roles
        k = thoughts.num_thoughts
        windows = [self.window_of(c) for c in contexts]
        seqs = thoughts.interpreter_sequences(roles.sot_id, roles.eot_id) if k else [[] for _ in contexts]
        base_in_batch = roles.shared("base", "interpreter")
        null_row = [self.null_seq] if null else []
        rows = [seqs[i] + null_row + ([[]] if base_in_batch else []) for i in range(len(contexts))]
        return windows, rows, base_in_batch

    def score(
        self,
        contexts: list[list[int]],
        targets: list[list[int]],
        thoughts: ThoughtBatch,
        lean: bool = True,
        null: bool = True,
    ) -> Scores:
        """Target log-probs (teacher-forced on ``targets``); ``lean=False`` gathers them from full distributions;
        ``null=False`` leaves the null thought's row out."""
        return self.target_scores(*self._states(contexts, targets, thoughts, null), lean=lean, null=null)

    def distributions(
        self, contexts: list[list[int]], targets: list[list[int]], thoughts: ThoughtBatch
    ) -> Distributions:
        """Full next-token log-distributions at every target position (teacher-forced on ``targets``)."""
        return self.mix(*self._states(contexts, targets, thoughts))

    def _states(self, contexts: list[list[int]], targets: list[list[int]], thoughts: ThoughtBatch, null: bool = True):
        """Last hidden states predicting the targets: (base (N, 1, n, d), interpreter (N, K+1, n, d) — K rows without
        ``null`` —, target ids and mask (N, n))."""
        roles, pad = self.roles, self.pad_id
        n_pos = len(contexts)
        device = roles.model("interpreter").device
        target_ids, target_mask = self._pad_targets(targets, device)
        n = target_ids.shape[1]
        windows, rows, base_in_batch = self._rows(contexts, thoughts, null)
        r = len(rows[0])
        # Suffix = [last window token] + thought + y[:-1]; the state at len(thought) + j predicts y_j.
        suffixes = [[w[-1], *z, *y[:-1]] for w, row, y in zip(windows, rows, targets) for z in row]
        starts = torch.tensor([len(z) for row in rows for z in row], device=device)
        _, hidden, _ = forward_shared_prefix(
            roles.model("interpreter"), [w[:-1] for w in windows], suffixes, pad, need_logits=False
        )
        h = _gather_targets(hidden, starts, n).reshape(n_pos, r, n, -1)
        if base_in_batch:
            h_interp, h_base = h[:, :-1], h[:, -1:]
        else:
            h_interp = h
            _, hb, _ = forward_shared_prefix(
                roles.model("base"),
                [w[:-1] for w in windows],
                [[w[-1], *y[:-1]] for w, y in zip(windows, targets)],
                pad,
                need_logits=False,
            )
            h_base = _gather_targets(hb, torch.zeros(n_pos, dtype=torch.long, device=device), n)[:, None]
        return h_base, h_interp, target_ids, target_mask

    def target_scores(self, h_base, h_interp, target_ids, target_mask, lean: bool = True, null: bool = True) -> Scores:
        """Scores from last hidden states: base (N, 1, n, d), interpreter (N, K+1, n, d) (null row last; ``null``
        False: K rows, no null thought); any further axes before n (e.g. candidates) ride along.

        Lean (the default): only the targets' log-probs, the LM heads run in checkpointed row chunks, so no
        (N, K+1, n, V) tensor exists in the forward or the backward. ``lean=False``: gathered from ``mix``'s full
        distributions (the reference; values and gradients are the same). Shared by the per-position forwards above
        and the parallel passes (``window_scoring``)."""
        if not lean:
            return replace(self.mix(h_base, h_interp, target_ids, target_mask).scores(), has_null=null)
        roles = self.roles
        lm_base, lm_interp = roles.true_token_head("base"), roles.true_token_head("interpreter")
        logp_base = chunked_logps.target_logps(lm_base, h_base[:, 0], target_ids)  # (N, n)
        need_interp = self.reward_source == "interpreter"
        logp, weight, logp_interp = roles.head(
            h_base, h_interp, lm_base, lm_interp, target_ids=target_ids[:, None], need_interp=need_interp
        )
        logp_reward = logp_interp if need_interp and logp_interp is not None else logp
        return Scores(logp, logp_reward, logp_base, weight, target_ids, target_mask, has_null=null)

    def mix(self, h_base, h_interp, target_ids, target_mask) -> Distributions:
        """Distributions from last hidden states: base (N, 1, n, d), interpreter (N, K+1, n, d) (null row last)."""
        roles = self.roles
        lm_base, lm_interp = roles.true_token_head("base"), roles.true_token_head("interpreter")
        mixed, weight = roles.head(h_base.expand_as(h_interp), h_interp, lm_base, lm_interp)
        logp_interp = None
        if self.reward_source == "interpreter" and roles.head.form != "none":
            logp_interp = torch.log_softmax(lm_interp(h_interp).float(), -1)
        logp_base = torch.log_softmax(lm_base(h_base[:, 0]).float(), -1)
        return Distributions(mixed, logp_interp, logp_base, weight, target_ids, target_mask)

    @torch.no_grad()
    def candidates(self, contexts: list[list[int]], candidates: list[list[list[int]]], thoughts: ThoughtBatch):
        """Per-token log-probs of C candidate answers after each thought (evaluation: multiple choice).

        Context, then each thought, then each candidate are computed once (``forward_two_level``), so scoring C
        answers costs little more than one. Returns ``Scores``-like tensors with a candidate axis:
        logp / logp_reward (N, K+1, C, n), logp_base (N, C, n), target_ids and target_mask (N, C, n)."""
        roles, pad = self.roles, self.pad_id
        n_pos, c = len(contexts), len(candidates[0])
        if any(len(cands) != c for cands in candidates):
            raise ValueError("every position needs the same number of candidates")
        device = roles.model("interpreter").device
        padded, padded_mask = self._pad_targets([y for cands in candidates for y in cands], device)
        n = padded.shape[1]
        target_ids, target_mask = padded.reshape(n_pos, c, n), padded_mask.reshape(n_pos, c, n)
        windows, rows, base_in_batch = self._rows(contexts, thoughts)

        def states(model, rows_):
            r = len(rows_[0])
            middles = [[w[-1], *z] for w, row in zip(windows, rows_) for z in row]
            tails = [y[:-1] for i, row in enumerate(rows_) for _ in row for y in candidates[i]]
            last, tail = forward_two_level(model, [w[:-1] for w in windows], middles, tails, pad)
            h = torch.cat([last.repeat_interleave(c, 0)[:, None], tail[:, : n - 1]], dim=1)
            return h.reshape(n_pos, r, c, n, -1)

        h = states(roles.model("interpreter"), rows)
        if base_in_batch:
            h_interp, h_base = h[:, :-1], h[:, -1:]
        else:
            h_interp, h_base = h, states(roles.model("base"), [[[]] for _ in contexts])
        s = self.target_scores(h_base, h_interp, target_ids, target_mask)  # (N, K+1, C, n) in bounded chunks
        return s.logp, s.logp_reward, s.logp_base, target_ids, target_mask


def _pick(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return logp.gather(-1, ids[..., None]).squeeze(-1)
