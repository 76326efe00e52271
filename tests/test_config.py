"""Configuration: recipes load, overrides win, bad input is a one-line error naming the fix."""

from pathlib import Path

import pytest

from thinkrl.cli import main
from thinkrl.config import load_config, to_yaml
from thinkrl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "recipe",
    sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "configs").rglob("*.yaml")
        if not {"accelerate", "coconut"} & set(p.parts)
    ),
)
def test_every_recipe_loads(recipe):
    cfg = load_config(ROOT / recipe)
    assert load_config(None, []).__class__ is cfg.__class__
    assert "rollout:" in to_yaml(cfg)


def test_overrides_win_and_types_convert():
    cfg = load_config(
        ROOT / "configs/default.yaml", ["rollout.num_thoughts=3", "learner.lr=0.5", "model.freeze=[head]"]
    )
    assert cfg.rollout.num_thoughts == 3 and cfg.learner.lr == 0.5 and cfg.model.freeze == ["head"]


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["rollout.num_thoghts=3"], "unknown config key"),
        (["rollout.num_thoughts=many"], "rollout.num_thoughts"),
        (["rollout.num_thoughts=1"], "leave-one-out needs at least 2"),
        (["head.form=magic"], "head.form='magic' is not one of"),
        (["model.weight_groups=[A,A,B]", "model.freeze=[base]"], "share weight group A"),
        (["trainer.max_steps"], "not key=value"),
        (["data.source=text"], "has no task positions"),
        (["data.source=text", "data.positions=every_k"], "needs data.train_file"),
    ],
)
def test_bad_config_is_one_clear_line(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "text, fragment", [("", "is empty"), ("# only a comment\n", "is empty"), ("- a\n", "mapping")]
)
def test_an_empty_config_file_is_refused(tmp_path, text, fragment):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(recipe, ["trainer.max_steps=1"])
    message = str(info.value)
    assert message.startswith(f"config file {recipe} is") and fragment in message and "\n" not in message


def _cli_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("thinkrl: error:"), err
    return err[0]


def test_cli_errors_have_no_traceback(capsys, tmp_path):
    out = f"trainer.output_dir={tmp_path / 'r'}"
    assert "does not exist" in _cli_error(capsys, ["train", "--config", str(tmp_path / "nope.yaml")])
    assert "unknown config key" in _cli_error(capsys, ["train", "bogus.key=1", out])
    # a missing data file, an empty dataset, a model path that does not exist
    missing = _cli_error(
        capsys,
        [
            "train",
            "data.source=gsm8k",
            f"data.data_dir={tmp_path}",
            out,
            "model.default.path=scratch",
            "model.tokenizer=byte",
        ],
    )
    assert "gsm8k/train.jsonl does not exist" in missing
    (tmp_path / "empty.txt").write_text("")
    empty = _cli_error(
        capsys,
        [
            "train",
            "data.source=text",
            "data.positions=every_k",
            f"data.train_file={tmp_path / 'empty.txt'}",
            f"data.eval_file={tmp_path / 'empty.txt'}",
            out,
        ],
    )
    assert "empty" in empty
    nomodel = _cli_error(
        capsys,
        [
            "train",
            "model.default.path=./no/such/model",
            out,
            "data.source=text",
            "data.positions=every_k",
            "data.train_file=x.txt",
        ],
    )
    assert "'./no/such/model' does not exist" in nomodel


def test_truncated_importance_sampling_needs_one_update_per_rollout():
    with pytest.raises(ConfigError, match="updates_per_rollout=1"):
        load_config(None, ["learner.tis_cap=2.0", "learner.updates_per_rollout=2"])
    assert load_config(None, ["learner.tis_cap=2.0"]).learner.tis_cap == 2.0


def test_fused_passes_name_what_they_need():
    text = ["data.source=text", "data.train_file=tinyshakespeare/input.txt", "data.positions=every_k"]
    ok = load_config(None, [*text, "rollout.fused_passes=true"])
    assert ok.fused_sampling() and ok.parallel_passes()
    # auto (the default) fuses where it can and falls back to the two phases without an error elsewhere
    assert load_config(None, text).fused_sampling()
    assert not load_config(None, [*text, "rollout.fused_passes=false"]).fused_sampling()
    assert not load_config(None, [*text, "rollout.backend=vllm"]).fused_sampling()
    assert not load_config(None, [*text, "learner.updates_per_rollout=2"]).fused_sampling()
    assert not load_config(None, []).fused_sampling()  # task positions: no parallel passes
    with pytest.raises(ConfigError, match="rollout.fused_passes"):
        load_config(None, [*text, "rollout.fused_passes=sometimes"])
    for extra, named in (
        (["rollout.backend=vllm"], "rollout.backend=hf"),
        (["model.weight_groups=[A,B,A]"], "one model as reasoner and interpreter"),
        (["data.interpreter_window=8"], "data.interpreter_window=0"),
        (["learner.updates_per_rollout=2"], "learner.updates_per_rollout=1"),
        (["rollout.thought_passes=per_position"], "parallel thought passes"),
    ):
        with pytest.raises(ConfigError, match=named.replace("[", r"\[")):
            load_config(None, [*text, "rollout.fused_passes=true", *extra])
