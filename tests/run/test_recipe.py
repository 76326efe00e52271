"""A run folder means one recipe: resuming under a changed recipe is refused before anything is written or built."""

import json
import shutil

import pytest
from conftest import TINY

from thinkrl.config import load_config, to_dict
from thinkrl.errors import ConfigError
from thinkrl.run.recipe import recipe_changes
from thinkrl.run.state import find_checkpoints
from thinkrl.run.trainer import Trainer

SHORT = ["trainer.max_steps=2", "trainer.dump_rollouts=false", "trainer.num_threads=1"]


def test_recipe_changes_name_each_key_and_ignore_what_may_change():
    old = to_dict(load_config(None, []))
    new = to_dict(
        load_config(
            None,
            ["rollout.num_thoughts=4", "learner.lr=0.01", "trainer.max_steps=7", "trainer.sharding=fsdp2"],
        )
    )
    assert recipe_changes(old, new) == ["rollout.num_thoughts (8 → 4)", "learner.lr (0.001 → 0.01)"]
    role_lr = to_dict(load_config(None, ["learner.role_lr={reasoner: 0.5}"]))
    assert recipe_changes(old, role_lr) == ["learner.role_lr.reasoner (unset → 0.5)"]
    assert recipe_changes(old, to_dict(load_config(None, ["model.weight_groups=[A,B,C]"]))) == [
        "model.weight_groups ([A, A, A] → [A, B, C])"
    ]


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A 2-step run with its final checkpoint, trained once for the module."""
    run = tmp_path_factory.mktemp("recipe") / "run"
    Trainer(load_config(None, [*TINY, *SHORT, f"trainer.output_dir={run}"])).train()
    assert [p.name for p in find_checkpoints(run)] == ["checkpoint-2"]
    return run


@pytest.fixture
def finished(two_steps, tiny_config, tmp_path):
    """A copy of that run in tiny_config's folder; returns (folder, make config for that folder)."""
    run = tmp_path / "run"
    shutil.copytree(two_steps, run)
    return run, lambda *overrides: tiny_config(*SHORT, *overrides)


def test_changed_recipe_is_refused_before_building_and_an_allowed_change_resumes(finished, monkeypatch):
    run, make = finished
    recorded = (run / "config.yaml").read_text()

    def no_models(cfg):
        raise AssertionError("a model was built before the recipe was checked")

    monkeypatch.setattr("thinkrl.run.trainer.build_roles", no_models)
    with pytest.raises(ConfigError) as info:
        Trainer(make("rollout.num_thoughts=2", "learner.lr=0.01", "trainer.max_steps=3"))
    message = str(info.value)
    assert "rollout.num_thoughts (4 → 2), learner.lr (0.001 → 0.01)" in message and "\n" not in message
    assert "max_steps" not in message and "trainer.output_dir" in message
    assert (run / "config.yaml").read_text() == recorded, "config.yaml must not be overwritten"
    monkeypatch.undo()

    resumed = Trainer(make("trainer.max_steps=3", "trainer.eval_every=1", "trainer.keep_checkpoints=1"))
    resumed.train()
    assert resumed.state.step == 3 and [p.name for p in find_checkpoints(run)] == ["checkpoint-3"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(0) == 1 and max(steps) == 3


def test_resume_never_into_a_folder_with_checkpoints_is_refused(finished):
    run, make = finished
    with pytest.raises(ConfigError, match=r"trainer.resume=never would start a new run .* \(checkpoint-2\)"):
        Trainer(make("trainer.resume=never"))


def test_a_start_without_checkpoints_restarts_the_same_recipe_only(finished):
    run, make = finished
    shutil.rmtree(run / "checkpoint-2")  # as if it died before its first checkpoint, metrics already written
    with pytest.raises(ConfigError, match=r"rollout.max_thought_len \(4 → 3\)"):
        Trainer(make("rollout.max_thought_len=3"))
    Trainer(make("trainer.max_steps=1")).train()  # same recipe: starts again at step 0, old metrics cleared
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 1]  # initial eval, step 1, final eval
    assert json.loads((run / "summary.json").read_text())["steps"] == 1


def test_a_folder_with_only_a_config_may_take_another_recipe(tiny_config, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("rollout:\n  num_thoughts: 8\n")
    Trainer(tiny_config("trainer.max_steps=0", "trainer.dump_rollouts=false", "trainer.num_threads=1")).train()
    assert "num_thoughts: 4" in (run / "config.yaml").read_text()
