"""The RL loop: rollout → score → rewards/advantages → update → sync → log/eval/save.

Run: ``thinkrl train --config configs/default.yaml`` (or ``accelerate launch -m thinkrl train ...``).
The run folder gets ``config.yaml``, ``metrics.jsonl``, ``rollouts/``, ``checkpoint-<step>/`` (accelerate state:
models, optimizer, scheduler, RNG, data position, trainer state; sharded runs keep models and optimizer in
``sharded/``), ``summary.json`` and ``results.md``; sharded runs also ``rank<i>/shards.json`` (what each
process holds).
A run restarted on the same folder resumes from its newest complete checkpoint; a changed recipe is refused there
(``run.recipe``: only length, cadence, logging and machine layout may change).
Every step logs the tokens each weight group's model processed per phase and their FLOPs (``compute``); the
cumulative training FLOPs are kept in checkpoints, ``trainer.max_flops``/``compute_match`` stop a run at a budget,
and ``learner.objective=lm`` runs the no-thought baseline step instead of the thought RL step (``lm_baseline``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from thinkrl import output_folder
from thinkrl.config import Config, to_yaml
from thinkrl.data.positions import PositionStream
from thinkrl.data.sources import build_pools
from thinkrl.data.windows import WindowPool, positions_of, window_batch
from thinkrl.distributed.checkpoint import is_sharded_checkpoint, load_sharded, load_unsharded_into, save_sharded
from thinkrl.distributed.grad_buckets import GradBucketReducer
from thinkrl.distributed.sharding import (
    check_vllm_fits,
    clip_gradients,
    gathered,
    group_grad_norms,
    hsdp_mesh,
    mixed_precision,
    reshard_all,
    shard_copy,
    shard_group,
    shard_roles,
    shard_sizes,
    uses_fsdp2,
)
from thinkrl.errors import ConfigError, NonFiniteLossError
from thinkrl.models.meta_loading import fill_sharded
from thinkrl.models.parallel_attention import check_supported
from thinkrl.models.roles import build_roles, set_threads
from thinkrl.prompts import null_thought_ids, reasoner_prompt, wrap_contexts
from thinkrl.rl import copy_gauge
from thinkrl.rl.ema import EmaReference, meta_copy
from thinkrl.rl.learner import PositionScoring, build_optimizer, compute_loss
from thinkrl.rl.lm_baseline import lm_loss, lm_models, position_target_logps, window_target_logps
from thinkrl.rl.scoring import Scorer
from thinkrl.rl.window_scoring import WindowScoring
from thinkrl.rollout import make_actor
from thinkrl.rollout.policy import position_seeds
from thinkrl.run.compute import ComputeCounter, crossed, flops_budget, matched_interval, merge_metrics, run_steps
from thinkrl.run.files import dump_rollouts, mean_or_nan, write_atomic, write_summary
from thinkrl.run.heldout import evaluate
from thinkrl.run.init_from import check_source, load_initial_weights
from thinkrl.run.recipe import clear_stale_outputs, plan_start
from thinkrl.run.rollout_pipeline import Draw, RolloutPipeline
from thinkrl.run.state import (
    find_checkpoints,
    init_tracker,
    log_metrics,
    lr_at_restored_step,
    make_accelerator,
    resume,
    save_checkpoint,
)
from thinkrl.run.warmup import lm_warmup

logger = logging.getLogger(__name__)
POST_BUILD_SEED_OFFSET = 1_000_003  # the RNG stream after the models are built (sampling seeds) is its own


class TrainerState:
    """Loop counters, the initial evaluation and the compute totals, saved in every checkpoint (accelerate custom
    object), so a resumed run continues its FLOP count (steps redone after a crash are counted once)."""

    def __init__(self):
        self.step = 0
        self.initial_eval: dict | None = None
        self.last_eval: dict | None = None
        self.compute: dict = {}  # global totals across processes, see compute.add_into

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


class Trainer:
    # Unsharded data parallelism (_average_gradients): the bucketed reducer of the parameter list being trained, and
    # the all-reduces it issued this step (train/grad_collectives).
    _reducer: GradBucketReducer | None = None
    _grad_collectives: int = 0

    def __init__(self, cfg: Config, overwrite: bool = False):
        """``overwrite``: train in a folder holding files thinkrl did not write, replacing only a run's own files
        (``thinkrl.output_folder``); without it such a folder is refused."""
        self.cfg = cfg
        tc = cfg.trainer
        # a changed recipe, a folder of someone else's or a source that does not fit fails here, before anything is
        # written or built
        folder, stale = plan_start(cfg, overwrite)
        check_source(cfg)
        set_threads(tc.num_threads)
        self.run_dir = Path(tc.output_dir)
        self.accelerator = make_accelerator(tc, self.run_dir)
        self.sharded = uses_fsdp2(self.accelerator, tc.sharding)
        self.mesh = None  # trainer.sharding=hsdp: machines × processes (sharding.hsdp_mesh)
        set_seed(tc.seed)
        self.is_main = self.accelerator.is_main_process
        if self.is_main:
            output_folder.claim(folder)
            if stale:
                clear_stale_outputs(self.run_dir)
            (self.run_dir / "rollouts").mkdir(parents=True, exist_ok=True)
            write_atomic(self.run_dir / "config.yaml", to_yaml(cfg))

        # sharded: pretrained models come without weights and each process reads only its shards (meta_loading)
        self.roles = build_roles(cfg, meta=self.sharded and cfg.model.sharded_loading == "meta")
        self.parallel = cfg.parallel_passes()
        if self.parallel:  # fail before any data is read
            for model in self.roles.models.values():
                check_supported(model)
        wants_ema = cfg.reward.baseline == "ema" and cfg.learner.objective == "thoughts"
        ema_copy = None  # sharded: the EMA reference's copy of the interpreter, sharded as the interpreter is
        if self.sharded:  # before the optimizer: it must hold the sharded parameters
            policy = mixed_precision(self.accelerator.mixed_precision)
            self.mesh = hsdp_mesh(tc.sharding, self.accelerator.device.type)
            fill = partial(fill_sharded, cfg, self.roles.tokenizer)
            if wants_ema:  # copied before sharding (no weights), then sharded by the same calls
                ema_copy = meta_copy(self.roles.model("interpreter"))
            shard_roles(self.roles, self.accelerator.device, policy, fill, self.mesh)
            if ema_copy is not None:
                shard_copy(ema_copy, self.accelerator.device, policy, self.mesh)
            rank_dir = self.run_dir / f"rank{self.accelerator.process_index}"
            rank_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(rank_dir / "shards.json", json.dumps(shard_sizes(self.roles), indent=2))
        load_initial_weights(cfg, self.roles)  # model.init_from: another run's weights, before the optimizer
        # What is sampled must not depend on how the models were built: a whole load draws new vocabulary rows and
        # LoRA matrices from the global RNG, a sharded (meta) load from generators of its own.
        set_seed(tc.seed + POST_BUILD_SEED_OFFSET)
        tok = self.roles.tokenizer
        self.train_pool, self.eval_pool = build_pools(cfg.data, tok, tc.seed)
        # Every process walks the same stream and takes its slice of each global batch (see _next_batch), so a run
        # sees the same data and thoughts whatever the process count, and resumes across process counts.
        world = self.accelerator.num_processes
        if self.parallel:  # whole windows: each is read once and all its positions think together
            windows = WindowPool(self.train_pool)
            self.stream = PositionStream(windows, tc.seed)
            per_window = windows.slots_per_window()
            self.batch_windows = max(1, tc.batch_positions // per_window)
            if self.batch_windows % world:
                raise ConfigError(
                    f"trainer.batch_positions={tc.batch_positions} makes {self.batch_windows} windows of "
                    f"{per_window} positions per step, not a multiple of the {world} processes"
                )
        else:
            self.stream = PositionStream(self.train_pool, tc.seed)
            if tc.batch_positions % world:
                raise ConfigError(
                    f"trainer.batch_positions={tc.batch_positions} must be a multiple of the {world} processes"
                )
        self.batch_items = self.batch_windows if self.parallel else tc.batch_positions  # drawn per global batch
        null_ids = null_thought_ids(cfg.rollout.null_thought, tok)
        self.reasoner_prompt = reasoner_prompt(cfg.rollout.reasoner_template, tok)
        self.scorer = Scorer(self.roles, null_ids, cfg.data.interpreter_window, cfg.reward.source)
        self.optimizer, self.scheduler = build_optimizer(cfg, self.roles)
        if self.sharded:  # FSDP2 already placed and wraps the models; accelerate keeps the schedule and RNG
            self.scheduler = self.accelerator.prepare(self.scheduler)
        else:
            prepared = self.accelerator.prepare(
                *self.roles.models.values(), self.roles.head, self.optimizer, self.scheduler
            )
            self.optimizer, self.scheduler = prepared[-2], prepared[-1]
            for group, model in zip(list(self.roles.models), prepared):
                self.roles.models[group] = self.accelerator.unwrap_model(model)
        wrapper = len(self.reasoner_prompt.prefix) + len(self.reasoner_prompt.suffix) if self.reasoner_prompt else 0
        longest = cfg.data.context_len + wrapper + cfg.rollout.max_thought_len + 2
        if self.sharded and cfg.rollout.backend == "vllm":
            check_vllm_fits(self.roles, cfg.rollout, self.accelerator.num_processes)
        self.actor = make_actor(
            cfg.rollout, self.roles, self.run_dir / f"rank{self.accelerator.process_index}", longest
        )
        self.state = TrainerState()
        self.accelerator.register_for_checkpointing(self.stream, self.state)
        self.timings: dict[str, float] = {}
        # Tokens and FLOPs per weight group and phase (thinkrl/run/compute.py); a vLLM engine reports its own tokens.
        self.compute = ComputeCounter(self.roles.models, self.roles.role_group)
        self.actor.on_engine_tokens = lambda n: self.compute.add(self.roles.role_group["reasoner"], n)
        self.pipeline = None  # rollout.async_steps: the next steps' rollouts, sampled while the learner trains
        if cfg.rollout.async_steps and cfg.learner.objective == "thoughts":
            self.pipeline = RolloutPipeline(
                cfg.rollout.async_steps,
                cfg.learner.grad_accum_steps,
                cfg.rollout.num_thoughts,
                self._draw,
                self._prepare,
                self._redraw,
                lambda: self.actor.stats,
            )
            self.actor.on_engine_tokens = self.pipeline.engine_tokens(self.actor.on_engine_tokens)
        self.max_flops = flops_budget(tc.max_flops, tc.compute_match)
        # A compute-matched run saves and evaluates as often per FLOP as the run it matches, not every save_every /
        # eval_every of its many cheaper steps (compute.matched_interval).
        matched_steps = run_steps(tc.compute_match) if tc.compute_match else 0
        self.save_flops = matched_interval(tc.save_every, self.max_flops, matched_steps)
        self.eval_flops = matched_interval(tc.eval_every, self.max_flops, matched_steps)
        self.lm_models = lm_models(self.roles) if cfg.learner.objective == "lm" else {}
        self.ema = None
        if wants_ema:
            # After the compute counter: a whole copy inherits its hook, a sharded one is watched, so EMA forwards
            # count as the group's compute.
            self.ema = EmaReference(self.roles.model("interpreter"), cfg.reward.ema_decay, ema_copy)
            if ema_copy is not None:
                self.compute.watch(self.roles.role_group["interpreter"], self.ema.model)
            self.accelerator.register_for_checkpointing(self.ema)

    # ------------------------------------------------------------------------------------------------------------
    @contextmanager
    def _timed(self, phase: str):
        """Times the phase (``timing/<phase>``) and attributes the tokens of its forwards to it (``compute``)."""
        start = time.perf_counter()
        with self.compute.in_phase(phase):
            yield
        self.timings[f"timing/{phase}"] = self.timings.get(f"timing/{phase}", 0.0) + time.perf_counter() - start

    def _account(self) -> dict:
        """The compute metrics since the last call, summed over processes, added into the run's totals."""
        if self.accelerator.num_processes == 1:
            return self.compute.flush(self.state.compute)
        device = self.accelerator.device
        return self.compute.flush(
            self.state.compute, lambda v: self.accelerator.reduce(v.to(device), reduction="sum").cpu()
        )

    def _budget_spent(self) -> bool:
        """``trainer.max_flops``/``compute_match``: the run's training FLOPs have reached the budget."""
        return self.max_flops > 0 and self.state.compute.get("flops_total", 0) >= self.max_flops

    def _due(self, every: int, flops_interval: float, step: int, flops_before: float) -> bool:
        """Every ``every`` steps, or for a compute-matched run each time its FLOPs pass another ``flops_interval``
        (``self.save_flops``, ``self.eval_flops``)."""
        if flops_interval:
            return crossed(flops_before, self.state.compute.get("flops_total", 0), flops_interval)
        return bool(every) and step % every == 0

    def _save(self) -> Path:
        return save_checkpoint(
            self.accelerator,
            self.run_dir,
            self.state.step,
            self.roles.tokenizer,
            self.state.state_dict(),
            self.cfg.trainer.keep_checkpoints,
            save_weights=self._save_own_files if self.sharded or self.pipeline else None,
        )

    def _save_own_files(self, folder: Path) -> None:
        """What accelerate's state does not hold: sharded models, and each process's rollouts in flight."""
        if self.sharded:
            save_sharded(folder, self.roles, self.optimizer, self.ema.model if self.ema is not None else None)
        if self.pipeline is not None:
            self.pipeline.save(folder, self.accelerator.process_index, self.accelerator.num_processes)

    def _load_weights(self, path: Path) -> bool:
        """Models and optimizer of a checkpoint written in the other mode (see ``distributed.checkpoint``)."""
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper holds the torch one
        if is_sharded_checkpoint(path):  # the EMA reference's weights too (an unsharded one's are accelerate's)
            load_sharded(path, self.roles, optimizer, self.ema.model if self.ema is not None else None)
            return True
        if self.sharded:
            load_unsharded_into(path, self.roles, optimizer)
            return True
        return False

    def _gathered(self):
        """Sampling and evaluation see whole weights and issue no collectives (see ``sharding.gathered``)."""
        return gathered(self.roles.modules().values()) if self.sharded else nullcontext()

    def _evaluate(self) -> dict:
        with self._timed("eval"), self._gathered():
            return evaluate(
                self.cfg,
                self.roles,
                self.actor,
                self.scorer,
                self.eval_pool,
                seed=self.cfg.trainer.seed + 12345,
                reasoner_prompt=self.reasoner_prompt,
            )

    # ------------------------------------------------------------------------------------------------------------
    def step(self) -> tuple[dict, list, object, object]:
        """One optimizer step over ``grad_accum_steps`` rollout micro-batches.

        Returns (metrics, positions, thoughts, loss output) of the last micro-batch for dumping."""
        cfg, lc = self.cfg, self.cfg.learner
        if lc.objective == "lm":
            return self._lm_step()
        stats_sum: dict[str, float] = {}
        taken = self._take_rollouts() if self.pipeline is not None else None
        for micro in range(lc.grad_accum_steps):
            if taken is not None:  # sampled in the background (rollout.async_steps)
                positions, scoring, thoughts = taken[micro].positions, taken[micro].scoring, taken[micro].thoughts
            else:
                positions, scoring, sample = self._next_batch()
                with self._timed("rollout"), self._gathered():
                    try:
                        thoughts = sample(cfg.rollout.num_thoughts)
                    except NonFiniteLossError as exc:
                        self._non_finite(str(exc))
            logp_ema = None
            if self.ema is not None:
                with self._timed("score_and_loss"):
                    logp_ema = self._ema_logps(positions, scoring)
            for _update in range(lc.updates_per_rollout):
                with self._timed("score_and_loss"):
                    out = compute_loss(cfg, scoring, thoughts, logp_ema)
                if not torch.isfinite(out.loss):
                    self._non_finite(f"loss is {float(out.loss)}")
                # the last backward before an optimizer step also starts the gradient all-reduces
                with self._backward(_update < lc.updates_per_rollout - 1 or micro == lc.grad_accum_steps - 1):
                    self.accelerator.backward(out.loss / lc.grad_accum_steps)
                if _update < lc.updates_per_rollout - 1:  # further updates on these rollouts make them stale
                    self._optimizer_step()
                    self.actor.after_update()
                    thoughts.staleness += 1
            for key, value in out.stats.items():
                stats_sum[key] = stats_sum.get(key, 0.0) + value / lc.grad_accum_steps
            step_stats = {}
            if out.rewards is not None:  # None: the null thought is the reference and was not scored (score_null)
                step_stats["reward"] = mean_or_nan(out.rewards)
            if thoughts.num_thoughts:  # copy_rate, copy_rate_target, reward_copy_share (raw rewards): copy_gauge
                scores = out.scores
                first, whole = copy_gauge.copy_flags(
                    thoughts.thought_ids, thoughts.lengths, scores.target_ids, scores.target_mask
                )
                step_stats.update(copy_rate=float(first.float().mean()), copy_rate_target=float(whole.float().mean()))
                if out.rewards is not None:
                    # reward_copy_share is a ratio of sums over the whole step, every micro-batch and process
                    copying, positive = copy_gauge.positive_reward_sums(out.rewards, first)
                    step_stats.update(positive_reward_copying=float(copying), positive_reward=float(positive))
            for key, value in step_stats.items():
                stats_sum[key] = stats_sum.get(key, 0.0) + value / lc.grad_accum_steps
        grad_norm = self._optimizer_step()
        if self.pipeline is not None:
            with self._timed("rollout"):  # the engine's weights change next: nothing may be sampling then
                self.pipeline.drain()
                if self.accelerator.num_processes > 1:  # served engines are shared: every process has drained
                    self.accelerator.wait_for_everyone()
        with self._timed("sync"):
            self.actor.after_update()
        self.state.step += 1
        k = thoughts.num_thoughts
        metrics = {
            **{f"train/{k_}": v for k_, v in stats_sum.items()},
            "train/grad_norm": grad_norm,
            **self.group_norms,
            **self._collective_metrics(),
            "train/thought_len": mean_or_nan(thoughts.lengths),
            "train/unfinished_rate": mean_or_nan((~thoughts.finished).float()),
            "train/mix_weight": float(out.scores.weight[:, :k].detach().float().mean()) if k else 1.0,
            "train/staleness": thoughts.staleness,
            "train/lr": self.scheduler.get_last_lr()[0],
            **(taken[-1].stats if taken is not None else self.actor.stats),
        }
        if out.null_rewards is not None or not k:
            metrics["train/null_rate"] = float((out.null_rewards.max(dim=1).values <= 0).float().mean()) if k else 1.0
        self._mean_over_processes(metrics)
        if "train/positive_reward" in metrics:
            copying, total = metrics.pop("train/positive_reward_copying"), metrics.pop("train/positive_reward")
            metrics["train/reward_copy_share"] = copy_gauge.reward_copy_share(copying, total)
        metrics.update(self._account())  # token counts and FLOPs: summed over processes, not averaged
        return metrics, positions, thoughts, out

    def _lm_step(self) -> tuple[dict, list, None, None]:
        """The no-thought baseline's optimizer step (``learner.objective=lm``, see ``lm_baseline``): the batches a
        thought run takes, the target tokens' NLL under the base/interpreter models, no thought."""
        lc = self.cfg.learner
        stats_sum: dict[str, float] = {}
        for micro in range(lc.grad_accum_steps):
            positions, scoring, _ = self._next_batch()
            with self._timed("score_and_loss"):
                loss, stats = lm_loss(self.lm_models, self._target_logps(positions, scoring))
            if not torch.isfinite(loss):
                self._non_finite(f"loss is {float(loss)}")
            with self._backward(micro == lc.grad_accum_steps - 1):
                self.accelerator.backward(loss / lc.grad_accum_steps)
            for key, value in stats.items():
                stats_sum[key] = stats_sum.get(key, 0.0) + value / lc.grad_accum_steps
        grad_norm = self._optimizer_step()
        self.state.step += 1
        metrics = {
            **{f"train/{k}": v for k, v in stats_sum.items()},
            "train/grad_norm": grad_norm,
            **self.group_norms,
            **self._collective_metrics(),
            "train/lr": self.scheduler.get_last_lr()[0],
        }
        self._mean_over_processes(metrics)
        metrics.update(self._account())
        return metrics, positions, None, None

    def _target_logps(self, positions, scoring):
        """``model → (target log-probs, mask)`` of the LM baseline's batch: each window read once (parallel passes
        over whole windows), else each position's interpreter window then its targets."""
        markers = self.roles.marker_ids
        if isinstance(scoring, WindowScoring) and not self.scorer.window:
            return partial(window_target_logps, batch=scoring.batch, marker_ids=markers)
        windows = [self.scorer.window_of(p.context_ids) for p in positions]
        targets = [p.target_ids for p in positions]
        return partial(
            position_target_logps, windows=windows, targets=targets, pad_id=self.scorer.pad_id, marker_ids=markers
        )

    def _ema_logps(self, positions, scoring) -> torch.Tensor:
        """The EMA reference's target log-probs of a micro-batch, (N, n) in the scores' order: a read of whole
        windows gives (B, P, n), of which the valid slots are the positions."""
        logp = self.ema.logps(self._target_logps(positions, scoring))
        return scoring.to_positions(logp[:, None])[:, 0] if logp.dim() == 3 else logp

    def _mean_over_processes(self, metrics: dict) -> None:
        """Float metrics averaged over processes in place (grad norms are already global)."""
        if self.accelerator.num_processes > 1:  # report the global batch, not this process's share
            keys = sorted(
                k_ for k_, v in metrics.items() if isinstance(v, float) and not k_.startswith("train/grad_norm")
            )
            values = self.accelerator.reduce(
                torch.tensor([metrics[k_] for k_ in keys], device=self.accelerator.device), reduction="mean"
            )
            metrics.update(zip(keys, values.tolist()))

    def _take_rollouts(self) -> list:
        """This step's micro-batches from the pipeline (``rollout_pipeline``); the engine holds the weights of
        ``state.step`` updates, with which the batches it starts now are sampled."""
        with self._timed("rollout"):
            try:
                taken = self.pipeline.take(self.state.step)
            except NonFiniteLossError as exc:
                self._non_finite(str(exc))
            for sampled in taken:  # the engine's tokens count when the learner uses them, as a synchronous run's
                self.compute.add(self.roles.role_group["reasoner"], sampled.engine_tokens)
        return taken

    def _next_batch(self):
        """This process's share of the next global batch: (positions, scoring, sample(K) → ThoughtBatch)."""
        return self._prepare(*self._draw())

    def _draw(self) -> tuple[Draw, list]:
        """The next global batch (windows or positions) and its seeds. Sampling seeds are drawn per position of the
        global batch, the same on every process (they share torch's RNG state), so a position's thoughts do not
        depend on the process count."""
        stream = dict(self.stream.state_dict())
        items = self.stream.next_batch(self.batch_items)
        return Draw(stream, position_seeds(sum(len(w.slots) for w in items) if self.parallel else len(items))), items

    def _redraw(self, draw: Draw) -> list:
        """The windows or positions of a saved draw, read again from the stream state it recorded."""
        stream = PositionStream(self.stream.pool, draw.stream["seed"])
        stream.load_state_dict(draw.stream)
        return stream.next_batch(self.batch_items)

    def _prepare(self, draw: Draw, items: list):
        """This process's share of a drawn global batch: (positions, scoring, sample(K) → ThoughtBatch)."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        seeds = draw.seeds
        if self.parallel:
            windows = items
            share = self.batch_windows // world
            skip = sum(len(w.slots) for w in windows[: rank * share])
            windows = windows[rank * share : (rank + 1) * share]
            positions = positions_of(windows)
            seeds = seeds[skip : skip + len(positions)]
            batch = window_batch(windows, self.roles.tokenizer.pad_token_id, self.accelerator.device)
            scoring = WindowScoring(self.cfg, self.roles, self.scorer, batch)
            if self.cfg.fused_sampling():  # sampled in the passes the loss then reuses (WindowScoring)
                return positions, scoring, lambda k: scoring.sample_in_passes(self.cfg.rollout, k, seeds)
            return positions, scoring, lambda k: self.actor.sample_windows(batch, k, seeds)
        global_batch = self.cfg.trainer.batch_positions
        positions = items
        share = global_batch // world
        positions, seeds = positions[rank * share : (rank + 1) * share], seeds[rank * share : (rank + 1) * share]
        contexts, targets = [p.context_ids for p in positions], [p.target_ids for p in positions]
        reasoner_contexts = wrap_contexts(self.reasoner_prompt, contexts)
        scoring = PositionScoring(self.roles, self.scorer, contexts, targets, reasoner_contexts)
        return positions, scoring, lambda k: self.actor.sample(reasoner_contexts, k, seeds)

    def _optimizer_step(self) -> float:
        """Average, clip and apply the gradients; records each parameter group's norm in ``self.group_norms``."""
        with self._timed("optimizer"):
            max_norm = self.cfg.learner.max_grad_norm
            params = self._trainable()
            self._before_step(params)
            if self.sharded:
                norm = self._clip_sharded(params, max_norm)
            else:
                norm = self._clip(params, max_norm)
            if not math.isfinite(norm):
                self._non_finite(f"gradient norm is {norm}")
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update()
        return norm

    def _clip_sharded(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        norms = group_grad_norms(self.optimizer.param_groups, shard_group(self.mesh))
        self.group_norms = {f"train/grad_norm/{name}": value for name, value in norms.items()}
        total = math.sqrt(sum(v * v for v in norms.values()))
        if max_norm > 0 and math.isfinite(total):
            clip_gradients(params, total, max_norm)
        return total

    def _clip(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        self.group_norms = {
            f"train/grad_norm/{g['name']}": float(
                torch.linalg.vector_norm(
                    torch.stack(
                        [torch.linalg.vector_norm(p.grad) for p in g["params"] if p.grad is not None]
                        or [torch.zeros(())]
                    )
                )
            )
            for g in self.optimizer.param_groups
        }
        norm = self.accelerator.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        return float(norm) if norm is not None else float("nan")

    def _before_step(self, params: list[torch.nn.Parameter]) -> None:
        """Between backward and an optimizer step: free gathered shards (fsdp2) or average gradients."""
        if self.sharded:
            reshard_all(self.roles.modules().values())
        else:
            self._average_gradients(params)

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    @contextmanager
    def _backward(self, final: bool):
        """Times a backward; ``final``: an optimizer step follows it. With bucketed averaging (``grad_buckets``) the
        final backward all-reduces gradient buckets as they fill, earlier ones (accumulation) only accumulate."""
        reducer = self._reducer_for(self._trainable())
        with self._timed("backward"), reducer.no_sync() if reducer is not None and not final else nullcontext():
            yield

    def _reducer_for(self, params: list[torch.nn.Parameter]) -> GradBucketReducer | None:
        """The bucketed reducer over ``params`` (None: one process, fsdp2, or ``trainer.grad_bucket_mb=0``), built
        at first use and again when the list or the bucket size changes (the LM warm-up trains the models without
        the head; the benchmark switches sizes between steps). A reducer built after a backward hooked nothing in
        it; its ``finish`` then reduces every bucket."""
        mb = self.cfg.trainer.grad_bucket_mb
        wanted = not self.sharded and self.accelerator.num_processes > 1 and mb > 0
        current = self._reducer
        if current is not None and not (wanted and current.bucket_mb == mb and current.covers(params)):
            current.remove()  # its hooks would keep launching buckets
            self._reducer = None
        if wanted and self._reducer is None:
            self._reducer = GradBucketReducer(params, mb)
        return self._reducer

    def _average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Data-parallel gradient mean across processes (a no-op with one). Models are used unwrapped, since the
        scorer needs their hidden states and LM heads, so the all-reduce DDP would do happens here: in buckets
        reduced while backward runs (``grad_buckets``), or with ``trainer.grad_bucket_mb=0`` one blocking all-reduce
        per parameter (the benchmark's baseline)."""
        if self.accelerator.num_processes == 1:
            return
        reducer = self._reducer_for(params)
        if reducer is not None:
            self._grad_collectives += reducer.finish()
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad = self.accelerator.reduce(p.grad, reduction="mean")
        self._grad_collectives += len(params)

    def _collective_metrics(self) -> dict:
        """``train/grad_collectives``: the all-reduces this process issued this step to average gradients (unsharded
        multi-process runs: one per bucket, or one per parameter with ``trainer.grad_bucket_mb=0``)."""
        if self.sharded or self.accelerator.num_processes == 1:
            return {}
        return {"train/grad_collectives": self._grad_collectives}

    def _non_finite(self, what: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        ckpts = find_checkpoints(self.run_dir)
        last = f"last good checkpoint {ckpts[-1]} is intact" if ckpts else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"{what} at step {self.state.step + 1}; stopped before updating weights ({last}); "
            "lower learner.lr or set learner.max_grad_norm, then rerun to resume"
        )

    # ------------------------------------------------------------------------------------------------------------
    def train(self) -> dict:
        tc = self.cfg.trainer
        resumed = resume(self.accelerator, self.run_dir, tc.resume, load_weights=self._load_weights)
        if resumed is not None:
            lr_at_restored_step(self.scheduler)  # max_steps may have changed, and the schedule's length with it
            if self.pipeline is not None:
                world = self.accelerator.num_processes
                self.pipeline.load(resumed, self.accelerator.process_index, world, self.accelerator.device)
            logger.info("resumed at step %d", self.state.step)
        init_tracker(self.accelerator, tc, self.run_dir, self.cfg)
        start_time = time.perf_counter()
        if self.state.initial_eval is None and tc.lm_warmup_steps:
            self._lm_warmup()
            if self.ema is not None:  # the reference starts from the weights the RL starts from
                self.ema.reset()
        # The sampler started with the freshly built weights: a resume or a warm-up has changed them since.
        with self._timed("sync"):
            self.actor.sync_weights()
        if self.state.initial_eval is None:
            self.state.initial_eval = self._evaluate()
            self._log({**{f"eval/{k}": v for k, v in self.state.initial_eval.items()}, **self._account()}, step=0)
        bar = tqdm(
            total=None if self.max_flops else tc.max_steps,  # a FLOP budget ends it; max_steps only caps it
            initial=self.state.step,
            disable=not (self.is_main and tc.progress),
            desc="thinkrl",
            dynamic_ncols=True,
        )
        saved_step = None
        while self.state.step < tc.max_steps and not self._budget_spent():
            self.timings, self._grad_collectives = {}, 0
            flops_before = self.state.compute.get("flops_total", 0)
            started = time.perf_counter()
            metrics, positions, thoughts, out = self.step()
            self.timings["timing/step"] = time.perf_counter() - started  # wall time: overlapped sampling is hidden
            step = self.state.step
            last = step >= tc.max_steps or self._budget_spent()
            bar.update(1)
            if thoughts is None:  # learner.objective=lm
                bar.set_postfix(loss=f"{metrics['train/loss']:.3f}")
            else:
                # the reward and null rate are absent where the null thought was not scored (rl/null_row.py): the
                # loss shows instead
                shown = [("reward", "train/reward", ".3f"), ("null", "train/null_rate", ".2f")]
                shown += [] if "train/reward" in metrics else [("loss", "train/loss", ".3f")]
                shown.append(("len", "train/thought_len", ".1f"))
                bar.set_postfix({name: format(metrics[key], spec) for name, key, spec in shown if key in metrics})
            if self._due(tc.eval_every, self.eval_flops, step, flops_before) and not last:
                self.state.last_eval = self._evaluate()
                metrics.update({f"eval/{k}": v for k, v in self.state.last_eval.items()})
                merge_metrics(metrics, self._account())
            if step % tc.log_every == 0 or last:
                self._log({**metrics, **self.timings}, step=step)
                if tc.dump_rollouts and self.is_main and thoughts is not None:
                    dump_rollouts(
                        self.run_dir / "rollouts" / f"step-{step:06d}.jsonl",
                        step,
                        self.roles.tokenizer,
                        positions,
                        thoughts,
                        out,
                    )
            if self._due(tc.save_every, self.save_flops, step, flops_before):
                with self._timed("save"):
                    self._save()
                saved_step = step
        bar.close()
        final = self._evaluate()
        self.state.last_eval = final
        final_compute = self._account()  # before the save, so a checkpoint written now includes the final eval
        if saved_step != self.state.step:
            self._save()
        self._log({**{f"eval/{k}": v for k, v in final.items()}, **final_compute}, step=self.state.step)
        if self.is_main:
            compute = {**self.state.compute, "groups": self.compute.describe()}
            if self.max_flops:
                compute.update(max_flops=self.max_flops, compute_match=tc.compute_match)
            write_summary(
                self.run_dir,
                self.state.initial_eval,
                final,
                {
                    "steps": self.state.step,
                    "stopped_by": "max_flops" if self._budget_spent() else "max_steps",
                    "train_seconds_this_session": round(time.perf_counter() - start_time, 2),
                    "compute": compute,
                },
            )
        # Every process reaches here before any tears its process group down (end_training destroys it): a rank
        # that exits while another's collective is in flight can abort in gloo's teardown.
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return {"initial_eval": self.state.initial_eval, "final_eval": final}

    def close(self) -> None:
        """Stop the sampler's engine (vLLM) now rather than at interpreter exit; a later sample starts it again."""
        if self.pipeline is not None:
            self.pipeline.close()
        self.actor.close()

    def _lm_warmup(self) -> None:
        tc = self.cfg.trainer
        trainable = [m for m in self.roles.models.values() if any(p.requires_grad for p in m.parameters())]
        with self._timed("lm_warmup"):
            nll = lm_warmup(
                trainable,
                self.stream,
                tc.lm_warmup_steps,
                self.batch_items,
                self.cfg.learner.lr,
                self.roles.tokenizer.pad_token_id,
                show_progress=self.is_main and tc.progress,
                before_step=self._before_step,
            )
        self._log({"warmup/lm_nll": nll, **self.timings, **self._account()}, step=0)

    def _log(self, metrics: dict, step: int) -> None:
        log_metrics(self.accelerator, self.run_dir, self.cfg.trainer.report_to, step, metrics)
