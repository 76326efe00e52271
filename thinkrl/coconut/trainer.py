"""Coconut training loop: epochs → stage → batches of stage examples → latent forward → CE on steps and answer.

Run: ``thinkrl coconut train --config configs/coconut/synthetic_cpu.yaml`` (or ``accelerate launch -m thinkrl
coconut train ...``). The run folder gets ``config.yaml``, ``metrics.jsonl`` (with the stage of every step),
``stage_results.json`` (validation metrics at the end of each stage), ``eval-*.json`` and ``checkpoint-<step>/``:
accelerate state (model, optimizer, RNG), ``trainer_state.json`` (epoch, position in the epoch, stage) and the
tokenizer. Data order is a function of (seed, epoch), so a run restarted on the same folder resumes mid-epoch or at
a stage boundary and continues exactly as if never stopped (tested).

Simplified vs the original: constant learning rate (as published), one model (no separate reference), and
data-parallel gradients averaged by hand like the RL trainer, because the latent forward calls the unwrapped model
several times per step.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from thinkrl import output_folder
from thinkrl.coconut.config import CoconutConfig
from thinkrl.coconut.curriculum import example_stage, plan, scheduled_stage
from thinkrl.coconut.data import IGNORE, build_example, collate, load_split, tokenize_problem
from thinkrl.coconut.evaluation import evaluate
from thinkrl.coconut.latent_forward import latent_forward
from thinkrl.coconut.models import build_model, build_tokenizer, special_ids
from thinkrl.config import to_yaml
from thinkrl.errors import ConfigError, NonFiniteLossError
from thinkrl.models.roles import set_threads
from thinkrl.run.files import write_atomic
from thinkrl.run.state import (
    find_checkpoints,
    init_tracker,
    log_metrics,
    make_accelerator,
    resume,
    save_checkpoint,
)

logger = logging.getLogger(__name__)


class CoconutState:
    """Loop position, saved in every checkpoint (accelerate custom object)."""

    def __init__(self):
        self.global_step = 0
        self.epoch = 0
        self.step_in_epoch = 0  # optimizer steps already taken in `epoch`
        self.stage_results: dict = {}
        self.last_eval: dict | None = None

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


def sequence_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token CE over labelled positions. logits (B, T, V), labels (B, T) with -100 = ignored."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


def _is_coconut_run(folder: Path) -> bool:
    """A Coconut run folder written before folders carried thinkrl's stamp: its config.yaml reads as one."""
    from thinkrl.coconut.config import load_coconut_config

    try:
        load_coconut_config(folder / "config.yaml", [])
        return True
    except (ConfigError, OSError):
        return False


def folder_decision(cfg: CoconutConfig, overwrite: bool = False) -> output_folder.Decision:
    """thinkrl's folder rule for a Coconut run's ``trainer.output_dir`` (reads only; ``train`` claims it)."""
    return output_folder.decide(cfg.trainer.output_dir, "coconut", _is_coconut_run, overwrite)


class CoconutTrainer:
    def __init__(self, cfg: CoconutConfig, overwrite: bool = False):
        self.cfg = cfg
        tc = cfg.trainer
        # thinkrl's folder rule (thinkrl.output_folder): decided before anything is built, claimed when training
        self.folder = folder_decision(cfg, overwrite)
        set_threads(tc.num_threads)
        self.run_dir = Path(tc.output_dir)
        self.accelerator = make_accelerator(tc, self.run_dir)
        set_seed(tc.seed)
        self.is_main = self.accelerator.is_main_process
        self.tokenizer = build_tokenizer(cfg)
        self.ids = special_ids(self.tokenizer)
        self.model = build_model(cfg, self.tokenizer)
        self.model.to(self.accelerator.device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=cfg.optim.lr,
            weight_decay=cfg.optim.weight_decay,
            betas=tuple(cfg.optim.adam_betas),
        )
        # prepared so that save_state writes model.safetensors + optimizer; the latent forward uses the unwrapped model
        prepared_model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.model = self.accelerator.unwrap_model(prepared_model)
        self.state = CoconutState()
        self.accelerator.register_for_checkpointing(self.state)
        self.timings: dict[str, float] = {}
        self._problems: dict[str, list] = {}
        self._saved_step: int | None = None

    # ------------------------------------------------------------------------------------------------------------
    def problems(self, split: str) -> list:
        if split not in self._problems:
            raw = load_split(self.cfg.data, split)
            self._problems[split] = [
                tokenize_problem(p, self.tokenizer, self.ids.eos, self.cfg.data.chat_template) for p in raw
            ]
        return self._problems[split]

    def batches(self, epoch: int) -> list[list[int]]:
        """This process's micro-batches of problem indices for ``epoch``: a permutation seeded by (seed, epoch),
        cut into whole optimizer steps of grad_accum_steps micro-batches, sharded across processes."""
        tc, n_proc = self.cfg.trainer, self.accelerator.num_processes
        order = np.random.default_rng([tc.seed, epoch]).permutation(len(self.problems("train")))
        per_step = tc.batch_size * self.cfg.optim.grad_accum_steps * n_proc
        usable = max(len(order) // per_step, 1) * per_step  # drop the ragged tail so every step is full
        order = order[:usable].tolist()
        mine = order[self.accelerator.process_index :: n_proc]
        return [mine[i : i + tc.batch_size] for i in range(0, len(mine), tc.batch_size)]

    def steps_per_epoch(self) -> int:
        return len(self.batches(0)) // self.cfg.optim.grad_accum_steps

    def stage_examples(self, epoch: int, indices: list[int]) -> list[dict]:
        cur, train = self.cfg.curriculum, self.problems("train")
        stage = scheduled_stage(epoch, cur)
        out = []
        for i in indices:
            p = train[i]
            k = example_stage(stage, len(p.steps), cur, self.cfg.trainer.seed, epoch, i)
            out.append(build_example(p, plan(k, len(p.steps), cur), self.ids))
        return out

    @contextmanager
    def _timed(self, phase: str):
        start = time.perf_counter()
        yield
        self.timings[f"timing/{phase}"] = self.timings.get(f"timing/{phase}", 0.0) + time.perf_counter() - start

    # ------------------------------------------------------------------------------------------------------------
    def step(self, micro_batches: list[list[int]], epoch: int) -> dict:
        """One optimizer step. Input: grad_accum_steps lists of problem indices. Output: metrics."""
        loss_sum, latents, tokens = 0.0, 0, 0
        feedback = self.cfg.curriculum.mode == "coconut"
        for indices in micro_batches:
            with self._timed("collate"):
                batch = collate(self.stage_examples(epoch, indices), self.ids, latent_feedback=feedback)
                batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
            with self._timed("forward"):
                out = latent_forward(self.model, batch["input_ids"], batch["attention_mask"], batch["latent_mask"])
                loss = sequence_loss(out.logits, batch["labels"])
            if not torch.isfinite(loss):
                self.optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLossError(
                    f"loss is {float(loss)} at step {self.state.global_step + 1}; lower optim.lr "
                    "or set optim.max_grad_norm, then rerun to resume from the last checkpoint"
                )
            with self._timed("backward"):
                self.accelerator.backward(loss / len(micro_batches))
            loss_sum += float(loss.detach()) / len(micro_batches)
            latents += int((batch["input_ids"] == self.ids.latent).sum())
            tokens += int(batch["attention_mask"].sum())
        with self._timed("optimizer"):
            params = [p for p in self.model.parameters() if p.requires_grad]
            if self.accelerator.num_processes > 1:
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    p.grad = self.accelerator.reduce(p.grad, reduction="mean")
            max_norm = self.cfg.optim.max_grad_norm
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        rows = sum(len(b) for b in micro_batches)
        return {
            "train/loss": loss_sum,
            "train/grad_norm": float(norm),
            "train/latents_per_problem": latents / rows,
            "train/tokens": tokens,
        }

    def reset_optimizer(self) -> None:
        """A fresh AdamW (moments and step counts dropped) at a stage boundary, as Coconut's reset_optimizer."""
        self.optimizer.optimizer.state.clear()

    # ------------------------------------------------------------------------------------------------------------
    def evaluate(self, split: str = "valid", stage: int | None = None) -> dict:
        tc = self.cfg.trainer
        stage = scheduled_stage(self.state.epoch, self.cfg.curriculum) if stage is None else stage
        with self._timed("eval"):
            metrics, records = evaluate(
                self.model,
                self.tokenizer,
                self.problems(split),
                stage,
                self.cfg.curriculum,
                self.ids,
                tc.eval_batch_size,
                tc.max_new_tokens,
            )
        return {**metrics, "examples": records[:5]}

    def train(self) -> dict:
        tc, cur = self.cfg.trainer, self.cfg.curriculum
        if self.is_main:
            output_folder.claim(self.folder)
            write_atomic(self.run_dir / "config.yaml", to_yaml(self.cfg))
        if resume(self.accelerator, self.run_dir, tc.resume) is not None:
            logger.info(
                "resumed: epoch %d, step %d of it, global step %d",
                self.state.epoch,
                self.state.step_in_epoch,
                self.state.global_step,
            )
        init_tracker(self.accelerator, tc, self.run_dir, self.cfg)
        per_epoch = self.steps_per_epoch()
        total = per_epoch * tc.num_epochs if not tc.max_steps else min(tc.max_steps, per_epoch * tc.num_epochs)
        bar = tqdm(
            total=total, initial=self.state.global_step, disable=not (self.is_main and tc.progress), dynamic_ncols=True
        )
        start_time = time.perf_counter()
        stopped = False
        while self.state.epoch < tc.num_epochs and not stopped:
            epoch = self.state.epoch
            stage = scheduled_stage(epoch, cur)
            bar.set_description(f"coconut[{cur.mode}] epoch {epoch} stage {stage}")
            if self.state.step_in_epoch == 0 and epoch > 0 and stage != scheduled_stage(epoch - 1, cur):
                if cur.reset_optimizer:
                    self.reset_optimizer()
                logger.info("epoch %d: stage %d begins", epoch, stage)
            micro = self.batches(epoch)
            accum = self.cfg.optim.grad_accum_steps
            while self.state.step_in_epoch < per_epoch:
                self.timings = {}
                s = self.state.step_in_epoch
                metrics = self.step(micro[s * accum : (s + 1) * accum], epoch)
                self.state.step_in_epoch += 1
                self.state.global_step += 1
                bar.update(1)
                bar.set_postfix(stage=stage, loss=f"{metrics['train/loss']:.3f}")
                self._log({**metrics, "train/epoch": epoch, "train/stage": stage, **self.timings})
                if tc.save_every and self.state.global_step % tc.save_every == 0:
                    self._save()
                if tc.max_steps and self.state.global_step >= tc.max_steps:
                    stopped = True
                    break
            if stopped and self.state.step_in_epoch < per_epoch:
                break
            self._end_epoch(epoch)
        bar.close()
        if self._saved_step != self.state.global_step:
            self._save()
        self._log({"train/seconds_this_session": time.perf_counter() - start_time})
        self.accelerator.end_training()
        return {
            "stage_results": self.state.stage_results,
            "last_eval": self.state.last_eval,
            "global_step": self.state.global_step,
            "epoch": self.state.epoch,
        }

    def _end_epoch(self, epoch: int) -> None:
        tc, cur = self.cfg.trainer, self.cfg.curriculum
        self.state.epoch, self.state.step_in_epoch = epoch + 1, 0
        stage = scheduled_stage(epoch, cur)
        last_of_stage = epoch == tc.num_epochs - 1 or scheduled_stage(epoch + 1, cur) != stage
        periodic = tc.eval_every_epochs and (epoch + 1) % tc.eval_every_epochs == 0
        if last_of_stage or periodic:
            result = self.evaluate("valid", stage)
            self.state.last_eval = {k: v for k, v in result.items() if k != "examples"}
            self._log({f"eval/{k}": v for k, v in self.state.last_eval.items()} | {"eval/epoch": epoch})
            logger.info(
                "epoch %d stage %d: valid accuracy %.3f, cot_match %.3f, new tokens %.1f",
                epoch,
                stage,
                result["accuracy"],
                result["cot_match"],
                result["new_tokens"],
            )
            if last_of_stage:
                self.state.stage_results[str(stage)] = {**self.state.last_eval, "epoch": epoch}
                if self.is_main:
                    write_atomic(self.run_dir / "stage_results.json", json.dumps(self.state.stage_results, indent=2))
        if not tc.save_every:
            self._save()

    # ------------------------------------------------------------------------------------------------------------
    def load_checkpoint(self, path: Path) -> None:
        """Load a checkpoint's full state (used by ``thinkrl coconut eval``)."""
        if resume(self.accelerator, self.run_dir, str(path), trim_metrics=False) is None:
            raise ConfigError(f"{path} is not a complete checkpoint folder; give a checkpoint-<step> path")

    def latest_checkpoint(self) -> Path | None:
        return (find_checkpoints(self.run_dir) or [None])[-1]

    def _save(self) -> Path:
        final = save_checkpoint(
            self.accelerator,
            self.run_dir,
            self.state.global_step,
            self.tokenizer,
            self.state.state_dict(),
            self.cfg.trainer.keep_checkpoints,
        )
        self._saved_step = self.state.global_step
        return final

    def _log(self, metrics: dict) -> None:
        log_metrics(self.accelerator, self.run_dir, self.cfg.trainer.report_to, self.state.global_step, metrics)
