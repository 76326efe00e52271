"""Coconut's stage curriculum as pure functions (no model, no tokenizer), tested against a hand-made table.

``stage = epoch // epochs_per_stage``; with ``stage0_epochs`` >= 0 stage 0 lasts that many epochs instead, then
``stage = 1 + (epoch - stage0_epochs) // epochs_per_stage`` (0: a run initialised from a CoT checkpoint starts
at stage 1, like the published ``resume: 3``). At stage k <= max_latent_stage the first k reasoning steps
of a problem are replaced by k*c_thought latents; once the stage passes max_latent_stage every remaining text step
is dropped too (the model then answers straight after its latents, as in the published runs); from then on a
problem gets one group of latents per step it has (at most max_latent_stage), or always max_latent_stage groups
with pad_latent_to_max. Up to max_latent_stage every problem gets k groups, as published, even with fewer steps.
Modes other than coconut/pause have no curriculum: cot keeps every step, no_cot drops them all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from thinkrl.coconut.config import CurriculumConfig


@dataclass(frozen=True)
class StagePlan:
    """What one problem looks like at one stage."""

    n_latents: int  # <|latent|> tokens between the markers
    steps_skipped: int  # leading reasoning steps removed from the text (may exceed the problem's steps)
    markers: bool  # <|start-latent|> ... <|end-latent|> around the latents


def scheduled_stage(epoch: int, cfg: CurriculumConfig) -> int:
    """The stage of a (0-based) epoch; only coconut and pause follow the curriculum."""
    if cfg.mode not in ("coconut", "pause"):
        return 0
    first = cfg.epochs_per_stage if cfg.stage0_epochs < 0 else cfg.stage0_epochs
    return 0 if epoch < first else 1 + (epoch - first) // cfg.epochs_per_stage


def plan(stage: int, num_steps: int, cfg: CurriculumConfig) -> StagePlan:
    """Latents and skipped steps for a problem with ``num_steps`` steps at ``stage``."""
    if cfg.mode == "cot":
        return StagePlan(0, 0, False)
    if cfg.mode == "no_cot":
        return StagePlan(0, num_steps, False)
    if stage > cfg.max_latent_stage:  # past the last stage: no text steps left
        groups = cfg.max_latent_stage if cfg.pad_latent_to_max else min(num_steps, cfg.max_latent_stage)
        skipped = num_steps
    else:  # as published: k groups even when the problem has fewer than k steps
        groups = skipped = stage
    return StagePlan(groups * cfg.c_thought, skipped, cfg.latent_markers)


def example_stage(stage: int, num_steps: int, cfg: CurriculumConfig, seed: int, epoch: int, index: int) -> int:
    """The stage one training problem uses: the scheduled one, or with probability uniform_prob one drawn uniformly
    from [0, num_steps] (as published). Seeded by (seed, epoch, index) so a resumed run draws the same."""
    if cfg.uniform_prob <= 0 or cfg.mode not in ("coconut", "pause"):
        return stage
    rng = np.random.default_rng([seed, epoch, index])
    if rng.random() < cfg.uniform_prob:
        return int(rng.integers(0, num_steps + 1))
    return stage


def stage_boundaries(num_epochs: int, cfg: CurriculumConfig) -> list[int]:
    """Epochs at which a new stage starts (excluding epoch 0)."""
    return [e for e in range(1, num_epochs) if scheduled_stage(e, cfg) != scheduled_stage(e - 1, cfg)]
