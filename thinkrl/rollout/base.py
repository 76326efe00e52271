"""The rollout actor interface: sample K thoughts per position from the reasoner.

Backends (HF here, vLLM next) return the same ``ThoughtBatch``. A thought is ``<sot> z_1 .. z_m <eot>``;
the policy's actions are z_1..z_m plus the end token when the reasoner chose to stop (variable length).
A thought that reached ``max_thought_len`` without stopping is *unfinished*: the interpreter still sees an
end marker, appended by us and not counted as an action. The null thought is not sampled: the scorer
always adds it (``null_ids``).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from thinkrl.config import RolloutConfig
from thinkrl.data.windows import WindowBatch, batch_positions


@dataclass
class ThoughtBatch:
    """K sampled thoughts for each of N positions. Shapes: (N, K, M) and (N, K)."""

    thought_ids: torch.Tensor  # (N, K, M) actions z_1.. (+ eot if sampled), pad after
    thought_mask: torch.Tensor  # (N, K, M) bool, True on policy actions
    sampler_logps: torch.Tensor  # (N, K, M) log pi_sampler(action), 0 on padding
    finished: torch.Tensor  # (N, K) bool: stopped by sampling the end token (fixed length: always True)
    lengths: torch.Tensor  # (N, K) number of thought tokens z (end token excluded)
    staleness: int = 0  # learner updates since the sampler's weights were synced

    @property
    def num_positions(self) -> int:
        return self.thought_ids.shape[0]

    @property
    def num_thoughts(self) -> int:
        return self.thought_ids.shape[1]

    def interpreter_sequences(self, sot_id: int, eot_id: int) -> list[list[list[int]]]:
        """Per position, per thought: ``[sot] z_1..z_m [eot]`` as the interpreter reads it."""
        out = []
        for i in range(self.num_positions):
            row = []
            for k in range(self.num_thoughts):
                z = self.thought_ids[i, k, : int(self.lengths[i, k])].tolist()
                row.append([sot_id, *z, eot_id])
            out.append(row)
        return out


class RolloutActor(abc.ABC):
    """Samples thoughts after each context. ``contexts`` are full reasoner contexts (token lists)."""

    def __init__(self, cfg: RolloutConfig, sot_id: int, eot_id: int, pad_id: int):
        self.cfg, self.sot_id, self.eot_id, self.pad_id = cfg, sot_id, eot_id, pad_id
        self.stats: dict[str, float] = {}  # backend figures of the last sampling call, logged with the step
        # Compute accounting (thinkrl/run/compute.py) hooks the learner's models; a backend that runs its own engine
        # reports the tokens that engine computed through this callback (n tokens) when the trainer sets it.
        self.on_engine_tokens = None

    @abc.abstractmethod
    def sample(self, contexts: list[list[int]], num_thoughts: int, seeds: list[int]) -> ThoughtBatch:
        """K thoughts per context; ``seeds[i]`` alone decides position i's thoughts (any batch, any process)."""

    def sample_windows(self, batch: WindowBatch, num_thoughts: int, seeds: list[int]) -> ThoughtBatch:
        """K thoughts at every valid slot of the windows (position order of ``windows.batch_positions``).

        By default one request per position; a backend that can read each window once overrides this."""
        return self.sample(batch_positions(batch)[0], num_thoughts, seeds)

    def after_update(self) -> float:
        """Called after each learner update; returns seconds spent syncing weights (0 when the sampler *is* the
        learner's model, as in the HF backend)."""
        return self.sync_weights()

    def sync_weights(self) -> float:
        """Push the learner's reasoner weights to the sampler; returns seconds spent."""
        return 0.0

    def close(self) -> None:  # noqa: B027 - optional: only actors with an engine of their own override it
        """Release the sampler's engine, if it has one (the next sample starts it again)."""


def empty_thoughts(n: int, device) -> ThoughtBatch:
    """K = 0 (the control run): no sampled thought, only the null thought is scored."""
    z = torch.zeros((n, 0, 0), dtype=torch.long, device=device)
    return ThoughtBatch(
        z,
        z.bool(),
        z.float(),
        torch.zeros((n, 0), dtype=torch.bool, device=device),
        torch.zeros((n, 0), dtype=torch.long, device=device),
    )
