"""Overlapped sampling (``rollout.async_steps = N >= 1``): the sampler works on the next steps' batches while the
learner trains on the current one.

At the start of step t the batches of the steps up to t + N are drawn (data and seeds, in the main thread) and
handed to one background thread, which samples them with the engine's weights of that moment: version t, the
learner's weights after t updates. The learner meanwhile trains on step t's batch. Before the next weights are
pushed, the thread is drained, so an engine never changes weights under a request and every rollout's version is
exact. A batch used at step s was sampled at version >= s - N: ``train/staleness`` = s - version <= N, and the clipped
importance ratio (sampler log-probs against the learner's) corrects for the lag.

The thread only waits: the tokens are computed by vLLM's engine process (colocated) or by a server, so sampling
really overlaps learning. The HF sampler is the learner's own model and has no such overlap (config refuses it).

Checkpoints keep the rollouts in flight (``in-flight/rank<i>.pt``): each batch's draw (the stream's state before
it and its seeds) and this process's sampled thoughts, so a resumed run trains on exactly the rollouts the
uninterrupted one would. Resumed with another process count, those batches are drawn again and sampled again
with the restored weights (a warning says so): the data is the same, the thoughts are fresh.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from thinkrl.rollout.base import ThoughtBatch

logger = logging.getLogger(__name__)
FOLDER = "in-flight"


@dataclass
class Draw:
    """One micro-batch's data: the data stream's state before it was drawn, and its (global) sampling seeds."""

    stream: dict
    seeds: list[int]


@dataclass
class Sampled:
    """One micro-batch's rollouts as the learner takes them."""

    positions: list
    scoring: object
    thoughts: ThoughtBatch
    stats: dict = field(default_factory=dict)  # the sampler's figures (rollout/...) of this batch
    engine_tokens: int = 0  # tokens the engine computed for it (compute accounting)


@dataclass
class _Entry:
    step: int  # the update this batch is for
    version: int  # learner updates in the weights it is (or was) sampled with
    draws: list[Draw]
    prepared: list  # per micro-batch: (positions, scoring, sample(K) -> ThoughtBatch)
    future: Future | None = None
    sampled: list[Sampled] | None = None


class RolloutPipeline:
    """The rollouts of the next ``depth`` steps, sampled in the background.

    ``draw() -> (Draw, items)`` takes the next micro-batch's data from the live stream (main thread);
    ``redraw(Draw) -> items`` reads a saved draw's data again; ``prepare(Draw, items)`` makes this process's
    (positions, scoring, sample(K) -> ThoughtBatch) of it; ``stats_of()`` reads the sampler's figures of the batch
    it sampled last. ``num_thoughts`` is K."""

    def __init__(self, depth: int, micro_batches: int, num_thoughts: int, draw, prepare, redraw, stats_of):
        self.depth, self.micro_batches, self.k = depth, micro_batches, num_thoughts
        self._draw, self._prepare, self._redraw, self._stats_of = draw, prepare, redraw, stats_of
        self._queue: list[_Entry] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="thinkrl-rollouts")
        self._local = threading.local()  # the engine tokens of the batch this thread is sampling

    # ------------------------------------------------------------------------------------------------------------
    def engine_tokens(self, fallback):
        """The actor's ``on_engine_tokens``: tokens of a batch being sampled here go with that batch (counted when
        the learner takes it); any other sampling (evaluation) goes to ``fallback``."""

        def count(n: int) -> None:
            sink = getattr(self._local, "tokens", None)
            if sink is None:
                fallback(n)
            else:
                sink.append(n)

        return count

    def _sample(self, entry: _Entry) -> list[Sampled]:
        out = []
        for positions, scoring, sample in entry.prepared:
            self._local.tokens = []
            try:
                thoughts = sample(self.k)
                tokens = sum(self._local.tokens)
            finally:
                self._local.tokens = None
            out.append(Sampled(positions, scoring, thoughts, dict(self._stats_of()), tokens))
        return out

    def take(self, step: int) -> list[Sampled]:
        """Step ``step``'s micro-batches. First the batches up to ``step + depth`` start sampling in the background
        with the engine's current weights: those of ``step`` updates, its version (weights are pushed after every
        update); a step with nothing drawn yet (a fresh start) samples here."""
        if not self._queue:
            entry = self._new_entry(step, step)
            entry.sampled = self._sample(entry)
            self._queue.append(entry)
        while self._queue[-1].step < step + self.depth:
            entry = self._new_entry(self._queue[-1].step + 1, step)
            entry.future = self._pool.submit(self._sample, entry)
            self._queue.append(entry)
        head = self._queue.pop(0)
        assert head.step == step, (head.step, step)  # the queue holds consecutive steps
        if head.sampled is None and head.future is None:  # restored without its thoughts (another process count)
            head.version, head.sampled = step, self._sample(head)
        sampled = head.future.result() if head.sampled is None else head.sampled
        for s in sampled:
            s.thoughts.staleness = step - head.version
        return sampled

    def _new_entry(self, step: int, version: int) -> _Entry:
        drawn = [self._draw() for _ in range(self.micro_batches)]
        return _Entry(step, version, [d for d, _ in drawn], [self._prepare(d, items) for d, items in drawn])

    def _restored(self, saved: dict, version: int) -> _Entry:
        draws = [Draw(d["stream"], d["seeds"]) for d in saved["draws"]]
        return _Entry(saved["step"], version, draws, [self._prepare(d, self._redraw(d)) for d in draws])

    def drain(self) -> None:
        """Wait for every batch in flight (before the engine's weights change, and before a checkpoint)."""
        for entry in self._queue:
            if entry.sampled is None and entry.future is not None:
                entry.sampled, entry.future = entry.future.result(), None

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # ------------------------------------------------------------------------------------------------------------
    def save(self, folder: Path, rank: int, world: int) -> None:
        """Write this process's batches in flight into checkpoint ``folder`` (drained first)."""
        self.drain()
        entries = [
            {
                "step": e.step,
                "version": e.version,
                "draws": [{"stream": d.stream, "seeds": d.seeds} for d in e.draws],
                "thoughts": [_to_dict(s.thoughts) for s in e.sampled],
                "stats": [s.stats for s in e.sampled],
                "engine_tokens": [s.engine_tokens for s in e.sampled],
            }
            for e in self._queue
        ]
        target = Path(folder) / FOLDER
        target.mkdir(parents=True, exist_ok=True)
        torch.save({"world": world, "entries": entries}, target / f"rank{rank}.pt")

    def load(self, folder: Path, rank: int, world: int, device) -> None:
        """Restore the batches in flight a checkpoint recorded (none: a checkpoint of a synchronous run)."""
        self._queue = []
        path = Path(folder) / FOLDER / f"rank{rank}.pt"
        if not path.is_file():
            if (Path(folder) / FOLDER).is_dir():  # written by more processes than this run has
                logger.warning("%s has no rollouts for process %d: its batches are sampled again", folder, rank)
                self._resample_all(folder)
            return
        saved = torch.load(path, weights_only=True)
        if saved["world"] != world:
            logger.warning(
                "%s was written by %d processes, this run has %d: the rollouts in flight are sampled again with the "
                "restored weights (same data and seeds)",
                folder,
                saved["world"],
                world,
            )
        for e in saved["entries"]:
            entry = self._restored(e, e["version"] if saved["world"] == world else -1)
            if saved["world"] == world:
                entry.sampled = [
                    Sampled(p[0], p[1], _from_dict(t, device), stats, tokens)
                    for p, t, stats, tokens in zip(entry.prepared, e["thoughts"], e["stats"], e["engine_tokens"])
                ]
            self._queue.append(entry)  # without thoughts: sampled when the learner takes it

    def _resample_all(self, folder: Path) -> None:
        other = sorted((Path(folder) / FOLDER).glob("rank*.pt"))[0]
        self._queue = [self._restored(e, -1) for e in torch.load(other, weights_only=True)["entries"]]


def _to_dict(thoughts: ThoughtBatch) -> dict:
    return {f.name: _cpu(getattr(thoughts, f.name)) for f in fields(thoughts)}


def _cpu(value):
    return value.cpu() if isinstance(value, torch.Tensor) else value


def _from_dict(saved: dict, device) -> ThoughtBatch:
    return ThoughtBatch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in saved.items()})
