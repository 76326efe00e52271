"""The stage schedule against hand-made tables (Coconut's published rules)."""

import pytest

from thinkrl.coconut.config import CurriculumConfig
from thinkrl.coconut.curriculum import StagePlan, example_stage, plan, scheduled_stage, stage_boundaries

CUR = CurriculumConfig(mode="coconut", c_thought=2, epochs_per_stage=2, max_latent_stage=3)


def test_stage_per_epoch():
    assert [scheduled_stage(e, CUR) for e in range(10)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert stage_boundaries(10, CUR) == [2, 4, 6, 8]
    long_cot = CurriculumConfig(mode="coconut", epochs_per_stage=2, stage0_epochs=5)
    assert [scheduled_stage(e, long_cot) for e in range(10)] == [0, 0, 0, 0, 0, 1, 1, 2, 2, 3]
    from_cot = CurriculumConfig(mode="coconut", epochs_per_stage=3, stage0_epochs=0)  # published `resume: 3`
    assert [scheduled_stage(e, from_cot) for e in range(7)] == [1, 1, 1, 2, 2, 2, 3]
    for mode in ("cot", "no_cot"):
        assert {scheduled_stage(e, CurriculumConfig(mode=mode, epochs_per_stage=2)) for e in range(10)} == {0}


# (stage, steps in the problem) → (latents, steps skipped)   with c_thought=2, max_latent_stage=3
TABLE = {
    (0, 4): (0, 0),
    (1, 4): (2, 1),
    (2, 4): (4, 2),
    (3, 4): (6, 3),
    (4, 4): (6, 4),
    (9, 4): (6, 4),
    (0, 2): (0, 0),
    (1, 2): (2, 1),
    (2, 2): (4, 2),
    (3, 2): (6, 3),
    (4, 2): (4, 2),  # k groups up to the max stage
    (4, 5): (6, 5),  # past the max stage: no text step left even though 5 > max_latent_stage
}


@pytest.mark.parametrize(("stage", "steps"), sorted(TABLE))
def test_latents_and_replaced_steps(stage, steps):
    assert plan(stage, steps, CUR) == StagePlan(*TABLE[stage, steps], markers=True)


def test_pad_latent_to_max():
    padded = CurriculumConfig(
        mode="coconut", c_thought=2, epochs_per_stage=2, max_latent_stage=3, pad_latent_to_max=True
    )
    assert plan(4, 2, padded) == StagePlan(6, 2, True)  # unpadded: 4 latents
    assert plan(2, 2, padded) == StagePlan(4, 2, True)  # before the last stage padding changes nothing


def test_latents_without_markers():
    bare = CurriculumConfig(mode="coconut", c_thought=2, max_latent_stage=3, latent_markers=False)
    assert plan(2, 4, bare) == StagePlan(4, 2, False)


def test_modes_without_curriculum():
    assert plan(3, 4, CurriculumConfig(mode="cot")) == StagePlan(0, 0, False)
    assert plan(3, 4, CurriculumConfig(mode="no_cot")) == StagePlan(0, 4, False)
    assert plan(2, 4, CurriculumConfig(mode="pause", c_thought=2)) == StagePlan(4, 2, True)


def test_uniform_prob_draws_reproducible_stages():
    mixed = CurriculumConfig(mode="coconut", max_latent_stage=3, uniform_prob=1.0)
    draws = [example_stage(1, 4, mixed, seed=0, epoch=2, index=i) for i in range(200)]
    assert set(draws) == {0, 1, 2, 3, 4}  # uniform over 0..num_steps, as published
    assert draws == [example_stage(1, 4, mixed, seed=0, epoch=2, index=i) for i in range(200)]
    assert draws != [example_stage(1, 4, mixed, seed=0, epoch=3, index=i) for i in range(200)]
    half = CurriculumConfig(mode="coconut", max_latent_stage=3, uniform_prob=0.5)
    kept = sum(example_stage(7, 4, half, 0, 0, i) == 7 for i in range(400))
    assert 150 < kept < 250
    assert all(example_stage(2, 4, CUR, 0, 0, i) == 2 for i in range(50))
