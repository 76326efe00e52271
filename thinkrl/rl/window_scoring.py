"""Scoring and policy terms of thoughts at many positions of one window, in parallel passes.

Per window and model: one read of the window (``read_window``), then one forward of all thought sequences
``<sot> z <eot> y_0 .. y_{n-2}`` of all slots and K rows (``run_passes``; the passes are teacher-forced, so they run
as one forward whose diagonal is causal), and one more for the null thought (R = 1) when it is asked for. The
base's no-thought prediction of y_j at slot t is the window pass's own state at t - 1 + j. When the reasoner is the
interpreter's model and reads the same window (``interpreter_window`` 0, no reasoner template), the policy's logits
are the interpreter's states on ``<sot> z`` — the same forward, so nothing is read twice.

``interpreter_window`` W > 0 means each position's interpreter/base sees only its last W context tokens, read as a
fresh sequence. A band on the shared window keys would not be the same thing (deeper layers would carry text from
beyond the band), so those scores use the per-position scorer, whose cost is W + thought tokens per position —
linear in the window. The reasoner still reads the whole window in parallel passes.

The tensors returned are the per-position path's: ``Scores`` (N, K+1, n) and policy (N, K, M) with N the windows'
valid slots in order, so the learner cannot tell the paths apart.
"""

from __future__ import annotations

import torch

from thinkrl.data.windows import WindowBatch, batch_positions
from thinkrl.models.checkpointing import is_checkpointed
from thinkrl.models.parallel_passes import WindowRead, read_window, run_passes
from thinkrl.rl.scoring import Scorer, Scores
from thinkrl.rollout.base import ThoughtBatch
from thinkrl.rollout.policy import action_terms, hidden_action_terms
from thinkrl.rollout.thought_recorder import ThoughtRecorder


def thought_sequences(
    thought_ids: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor, sot: int, eot: int, pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``<sot> z_1..z_m <eot> y_0..y_{n-2}`` per thought, right-padded. thought_ids (N, K, M), lengths (N, K),
    targets (N, n) → (sequences (N, K, S), index of the state predicting y_0 (N, K))."""
    n_pos, k, m = thought_ids.shape
    n = targets.shape[-1]
    width = (int(lengths.max()) if lengths.numel() else 0) + 1 + n
    seq = torch.full((n_pos, k, width), pad, dtype=torch.long, device=thought_ids.device)
    seq[..., 0] = sot
    z = min(m, width - 1)
    seq[..., 1 : 1 + z] = thought_ids[..., :z]  # tokens past a thought's length are overwritten below or unused
    seq.scatter_(2, (1 + lengths)[..., None], eot)
    if n > 1:
        y_at = (2 + lengths)[..., None] + torch.arange(n - 1, device=seq.device)
        seq.scatter_(2, y_at, targets[:, None, : n - 1].expand(-1, k, -1))
    return seq, 1 + lengths


def _gather(hidden: torch.Tensor, starts: torch.Tensor, n: int) -> torch.Tensor:
    """hidden (..., S, d), starts (...) → (..., n, d): the states at starts + j."""
    index = (starts[..., None] + torch.arange(n, device=hidden.device)).clamp_max(hidden.shape[-2] - 1)
    return hidden.gather(-2, index[..., None].expand(*index.shape, hidden.shape[-1]))


class WindowScoring:
    """Scores and policy terms for one ``WindowBatch`` (the parallel counterpart of ``learner.PositionScoring``)."""

    def __init__(self, cfg, roles, scorer: Scorer, batch: WindowBatch):
        self.cfg, self.roles, self.scorer, self.batch = cfg, roles, scorer, batch
        self.valid = batch.valid.flatten()
        # Forwards shared by the scores and the policy terms of one loss; ``scores`` starts afresh, since the learner
        # may update the weights (and free these graphs) between losses on the same rollouts.
        self._reads: dict[int, WindowRead] = {}
        self._interp_hidden: torch.Tensor | None = None  # (B, K, P, S, d) thought rows, reused by the policy
        self._fused: tuple[dict, torch.Tensor] | None = None  # the window read and thought rows of sample_in_passes

    # ---- layout: (B, R, P, ...) passes  <->  (N, R, ...) positions ------------------------------------------
    def to_positions(self, x: torch.Tensor) -> torch.Tensor:
        b, r, p = x.shape[:3]
        return x.transpose(1, 2).reshape(b * p, r, *x.shape[3:])[self.valid]

    def to_slots(self, x: torch.Tensor, fill) -> torch.Tensor:
        """(N, R, ...) → (B, R, P, ...), padded slots filled with ``fill``."""
        b, p = self.batch.valid.shape
        grid = torch.full((b * p, *x.shape[1:]), fill, dtype=x.dtype, device=x.device)
        grid[self.valid] = x
        return grid.reshape(b, p, *x.shape[1:]).transpose(1, 2)

    def _read(self, model) -> WindowRead:
        if id(model) not in self._reads:
            self._reads[id(model)] = read_window(model, self.batch.ids)
        return self._reads[id(model)]

    # ---- scores ---------------------------------------------------------------------------------------------
    def scores(self, thoughts: ThoughtBatch, lean: bool = True, null: bool = True) -> Scores:
        """``Scores`` (N, K+1, n); ``lean``: see ``Scorer.target_scores``; ``null=False``: no null-thought row (its
        passes are skipped)."""
        fused, self._fused = self._fused, None
        self._reads, self._interp_hidden = ({}, None) if fused is None else fused
        if self.scorer.window:  # per-position windows of W tokens (see the module docstring)
            return self.scorer.score(*batch_positions(self.batch), thoughts, lean=lean, null=null)
        roles, batch, pad = self.roles, self.batch, self.scorer.pad_id
        device = batch.ids.device
        interp = roles.model("interpreter")
        read = self._read(interp)
        targets = self.to_positions(batch.target_ids[:, None])[:, 0]  # (N, n)
        target_mask = self.to_positions(batch.target_mask[:, None])[:, 0]
        n = targets.shape[-1]
        rows = []
        if thoughts.num_thoughts:
            seq, starts = thought_sequences(
                thoughts.thought_ids.to(device), thoughts.lengths.to(device), targets, roles.sot_id, roles.eot_id, pad
            )
            if self._interp_hidden is None:  # else the passes that sampled the thoughts (``sample_in_passes``)
                self._interp_hidden, _ = run_passes(interp, read, self.to_slots(seq, pad), batch.slot_len)
            hidden = self._interp_hidden
            rows.append(self.to_positions(_gather(hidden, self.to_slots(starts, 0), n)))
        if null:
            null_ids = torch.tensor(self.scorer.null_seq, device=device)
            null_seq = torch.cat([null_ids.expand(targets.shape[0], -1), targets[:, : n - 1]], dim=1)[:, None]
            hidden, _ = run_passes(interp, read, self.to_slots(null_seq, pad), batch.slot_len)
            starts = torch.full(hidden.shape[:3], len(null_ids) - 1, device=device)
            rows.append(self.to_positions(_gather(hidden, starts, n)))
        base_read = read if roles.shared("base", "interpreter") else self._read(roles.model("base"))
        # The window state at t - 1 + j has read x_<t and y_<j: the base's prediction of y_j, no thought.
        h = base_read.hidden
        index = ((batch.slot_len - 1)[..., None] + torch.arange(n, device=device)).clamp_max(h.shape[1] - 1)
        base = h.gather(1, index.flatten(1)[..., None].expand(-1, -1, h.shape[-1])).view(*index.shape, -1)
        h_base = self.to_positions(base[:, None])  # (N, 1, n, d)
        return self.scorer.target_scores(h_base, torch.cat(rows, dim=1), targets, target_mask, lean=lean, null=null)

    # ---- sampling inside the learning passes -----------------------------------------------------------------
    def sample_in_passes(self, cfg, k: int, seeds: list[int]) -> ThoughtBatch:
        """Sample K thoughts at every slot in passes that keep the graph, and feed each row's ``<eot> y_0..y_{n-2}``
        after its thought ends in the same passes: token s of ``thought_sequences``' row is fed at pass s (the tokens
        after the last sample all in one forward unless the layers are checkpointed), so the stacked passes are the
        teacher-forced thought rows ``scores`` and ``policy`` would run again. The next ``scores`` call reuses them
        and this window read (``fused_sampling`` says when that is the same computation).

        The samples, their log-probs and the recorder are the HF sampler's (``HFRolloutActor._sample_passes``): each
        pass's logits are taken from its detached hidden states, so sampling adds nothing to the graph."""
        roles, batch, pad = self.roles, self.batch, self.scorer.pad_id
        model = roles.model("interpreter")
        device = batch.ids.device
        b, p = batch.slot_len.shape
        read = read_window(model, batch.ids)
        targets = self.to_positions(batch.target_ids[:, None])[:, 0]  # (N, n)
        n, max_len = targets.shape[-1], cfg.max_thought_len
        y_rows = targets.repeat_interleave(k, 0)  # (N*K, n), rows position-major as the recorder's
        rec = ThoughtRecorder(batch.num_positions, k, max_len, pad, device)
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        lm_head = model.get_output_embeddings()
        history: dict = {}
        hidden_passes = []

        def run(columns: torch.Tensor, t: int) -> torch.Tensor:
            """Feed tokens (N*K, w) as passes t..t+w-1 of every row; the last states (N, K, w, d) go on the list."""
            w = columns.shape[1]
            grid = torch.full((b * p, k, w), pad, dtype=torch.long, device=device)
            grid[self.valid] = columns.view(-1, k, w)
            feed = grid.view(b, p, k, w).transpose(1, 2).contiguous()
            hidden, _ = run_passes(model, read, feed, batch.slot_len, t, history)
            hidden_passes.append(hidden)
            return hidden

        def after_thought(u: int) -> torch.Tensor:
            """Token u of each finished row: <eot> at 1 + length, then y_0..y_{n-2}, then padding."""
            after = u - rec.lengths - 2  # index of y at u (-1: the <eot>)
            post = torch.where(after >= 0, y_rows.gather(1, after.clamp(0, n - 1)[:, None])[:, 0], roles.eot_id)
            return torch.where((after >= -1) & (after < n - 1), post, pad)

        fed = torch.full((y_rows.shape[0],), roles.sot_id, dtype=torch.long, device=device)
        t = 0
        while t < max_len and not rec.all_done:  # one token per pass; each pass samples every row's next token
            hidden = run(fed[:, None], t)
            with torch.no_grad():
                logits = self.to_positions(lm_head(hidden.detach()[..., 0, :]))  # (N, K, V), as the sampler
            active = ~rec.done
            tokens = rec.step(t, logits.reshape(-1, logits.shape[-1]), generators, cfg, roles.sot_id, roles.eot_id)
            t += 1
            fed = torch.where(active, tokens, after_thought(t))
        # Sampling is over, so every row's remaining tokens are known: one pass of them all (teacher-forced, as the
        # scorer's) instead of one per token, which costs a pass's fixed overhead each. Not with checkpointed layers:
        # their recompute holds a whole pass's activations at once, and a pass of n + 1 tokens raised the large
        # model's peak at 1024 tokens from 6.0 to 7.4 GB in the same time (without checkpointing the passes' saved
        # activations are the same either way).
        last = int(rec.lengths.max()) + n  # the pass that feeds y_{n-2} of the longest thought
        rest = torch.stack([fed, *(after_thought(u) for u in range(t + 1, last + 1))], dim=1)
        if is_checkpointed(model):
            for j in range(rest.shape[1]):
                run(rest[:, j : j + 1], t + j)
        else:
            run(rest, t)
        self._fused = ({id(model): read}, torch.cat(hidden_passes, dim=3))
        return rec.result(cfg.length_mode == "fixed")

    # ---- policy ---------------------------------------------------------------------------------------------
    def policy(self, thoughts: ThoughtBatch, temperature: float, fixed_length: bool, lean: bool = True):
        """(logps, entropy) of the sampled actions, (N, K, M), differentiable; ``lean``: from the hidden states in
        checkpointed chunks (``policy.hidden_action_terms``), else from full logits (``policy.action_terms``)."""
        roles, batch = self.roles, self.batch
        device = batch.ids.device
        reasoner = roles.model("reasoner")
        actions = thoughts.thought_ids.to(device)
        mask = thoughts.thought_mask.to(device)
        m = actions.shape[-1]
        shared = roles.shared("reasoner", "interpreter") and not self.scorer.window
        if shared and self._interp_hidden is not None and self._interp_hidden.shape[-2] >= m:
            hidden = self._interp_hidden[..., :m, :]
        else:
            inputs = torch.cat([torch.full_like(actions[..., :1], roles.sot_id), actions[..., : m - 1]], dim=-1)
            slots = self.to_slots(inputs, self.scorer.pad_id)
            hidden, _ = run_passes(reasoner, self._read(reasoner), slots, batch.slot_len)
        lm_head = reasoner.get_output_embeddings()
        hidden = self.to_positions(hidden)  # (N, K, M, d)
        if lean:
            return hidden_action_terms(
                lm_head, hidden, actions, mask, temperature, roles.sot_id, roles.eot_id, fixed_length
            )
        logits = lm_head(hidden)  # (N, K, M, V)
        return action_terms(logits, actions, mask, temperature, roles.sot_id, roles.eot_id, fixed_length)
