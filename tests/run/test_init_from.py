"""``model.init_from``: a run starts from another run's weights exactly, with a fresh optimizer, step 0 and its own
folder; a source that does not fit is a one-line error before anything is written."""

import pytest
import torch

from thinkrl.errors import ConfigError
from thinkrl.eval.setup import load_setup
from thinkrl.run.trainer import Trainer


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """Two steps of a tiny [A, B, A] recipe with a gate head (checkpoint-2): weights far from their start."""
    from conftest import TINY

    from thinkrl.config import load_config

    out = tmp_path_factory.mktemp("source") / "run"
    cfg = load_config(
        None,
        [
            *TINY,
            "model.weight_groups=[A,B,A]",
            "head.form=gate",
            "learner.lr=1e-2",
            "trainer.max_steps=2",
            "trainer.dump_rollouts=false",
            f"trainer.output_dir={out}",
        ],
    )
    Trainer(cfg).train()
    return out


def _logits(roles, ids):
    return {group: model(input_ids=ids).logits for group, model in roles.models.items()}


def test_a_run_starts_from_the_source_weights_with_a_fresh_optimizer(tiny_config, source_run, tmp_path):
    source = load_setup(str(source_run), None, [])
    assert source.checkpoint.name == "checkpoint-2"
    new = Trainer(
        tiny_config(
            "model.weight_groups=[A,B,A]",
            "head.form=gate",
            f"model.init_from={source_run}",
            "learner.lr=1e-2",
            "trainer.max_steps=1",
            f"trainer.output_dir={tmp_path / 'new'}",
        )
    )
    ids = torch.randint(0, len(new.roles.tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs, ours = _logits(source.roles, ids), _logits(new.roles, ids)
    for group in ("A", "B"):
        assert (theirs[group] - ours[group]).abs().max().item() < 1e-6, group
    for (name, a), b in zip(source.roles.head.state_dict().items(), new.roles.head.state_dict().values()):
        assert torch.equal(a, b), f"head.{name}"
    assert new.state.step == 0 and not new.optimizer.state, "a fresh optimizer at step 0"
    assert (tmp_path / "new" / "config.yaml").is_file(), "in its own folder"


def test_a_head_of_another_form_stays_fresh(tiny_config, source_run):
    from thinkrl.models.roles import build_roles
    from thinkrl.run.init_from import load_initial_weights

    cfg = tiny_config("model.weight_groups=[A,B,A]", "head.form=mlp", f"model.init_from={source_run}")
    torch.manual_seed(0)
    fresh = build_roles(cfg)
    torch.manual_seed(0)
    started = build_roles(cfg)
    load_initial_weights(cfg, started)
    for a, b in zip(fresh.head.state_dict().values(), started.head.state_dict().values()):
        assert torch.equal(a, b)
    a_weights = dict(fresh.models["A"].named_parameters())
    changed = [n for n, p in started.models["A"].named_parameters() if not torch.equal(p, a_weights[n])]
    assert changed, "the models came from the source even though its head did not"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.weight_groups=[A,A,A]"], "model.weight_groups=['A', 'B', 'A'], this recipe ['A', 'A', 'A']"),
        (["model.weight_groups=[A,B,A]", "model.default.scratch.hidden_size=48"], "another model size"),
    ],
)
def test_a_source_that_does_not_fit_is_one_line(tiny_config, source_run, tmp_path, overrides, message):
    out = tmp_path / "new"
    cfg = tiny_config(*overrides, f"model.init_from={source_run}", f"trainer.output_dir={out}")
    with pytest.raises(ConfigError, match="model.init_from=") as caught:
        Trainer(cfg)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_missing_or_own_folder_is_refused_before_anything_is_written(tiny_config, tmp_path):
    out = tmp_path / "new"
    with pytest.raises(ConfigError, match="neither a thinkrl run folder"):
        Trainer(tiny_config(f"model.init_from={tmp_path / 'nowhere'}", f"trainer.output_dir={out}"))
    assert not (out / "config.yaml").exists()
    with pytest.raises(ConfigError, match="this run's own folder"):
        Trainer(tiny_config(f"model.init_from={out}", f"trainer.output_dir={out}"))


def test_the_compute_matched_baseline_starts_where_its_thought_run_starts(tmp_path):
    from thinkrl.study.sweep import plan

    runs, _, _ = plan(["model.init_from=runs/adapted"], [0], tmp_path, baseline=True)
    assert [r.folder.name for r in runs] == ["seed-0", "seed-0"] and runs[1].matches == runs[0].folder
    assert all("model.init_from=runs/adapted" in r.overrides for r in runs)
