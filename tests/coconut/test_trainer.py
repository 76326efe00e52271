"""Full-state checkpoints: a run stopped mid-stage or at a stage boundary resumes and continues identically;
the stage is logged; the CLI trains and evaluates."""

import json

import pytest
import torch
from safetensors.torch import load_file

from thinkrl.cli import main
from thinkrl.coconut.config import load_coconut_config
from thinkrl.coconut.trainer import CoconutTrainer
from thinkrl.run.state import find_checkpoints

# 64 problems / batch 8 = 8 steps an epoch; stages 0, 1, 2 over 3 epochs; a 32-wide 2-layer Llama.
TINY = [
    "model.scratch.hidden_size=32",
    "model.scratch.num_layers=2",
    "model.scratch.num_heads=2",
    "model.scratch.intermediate_size=64",
    'model.latent_init_token="="',
    "data.synthetic.num_ops=3",
    "data.synthetic.train_size=64",
    "data.synthetic.eval_size=4",
    "data.synthetic.test_size=6",
    "curriculum.mode=coconut",
    "curriculum.c_thought=2",
    "curriculum.epochs_per_stage=1",
    "curriculum.max_latent_stage=2",
    "curriculum.uniform_prob=0.3",
    "optim.lr=3e-3",
    "trainer.num_epochs=3",
    "trainer.batch_size=8",
    "trainer.eval_batch_size=3",
    "trainer.max_new_tokens=24",
    "trainer.report_to=none",
    "trainer.progress=false",
    "trainer.num_threads=1",
]


def _run(out, *extra):
    cfg = load_coconut_config(None, [*TINY, f"trainer.output_dir={out}", *extra])
    trainer = CoconutTrainer(cfg)
    trainer.train()
    return trainer


def _losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["train/loss"], r["train/stage"]) for r in rows if "train/loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    return out, _run(out)


def test_stage_is_logged_and_evaluated_per_stage(reference):
    out, trainer = reference
    losses = _losses(out)
    assert [losses[s][1] for s in sorted(losses)] == [0] * 8 + [1] * 8 + [2] * 8
    results = json.loads((out / "stage_results.json").read_text())
    assert sorted(results) == ["0", "1", "2"] and all(r["n"] == 4 for r in results.values())
    assert results["0"]["new_tokens"] > results["2"]["new_tokens"]  # fewer text steps left to write
    assert trainer.state.global_step == 24 and trainer.state.epoch == 3


@pytest.mark.parametrize("stop_at", [12, 8], ids=["mid-stage", "stage-boundary"])
def test_resume_continues_identically(reference, tmp_path, stop_at):
    ref_out, ref = reference
    first = _run(tmp_path, f"trainer.max_steps={stop_at}", f"trainer.save_every={stop_at}")
    assert first.state.global_step == stop_at
    assert [p.name for p in find_checkpoints(tmp_path)] == [f"checkpoint-{stop_at}"]
    resumed = _run(tmp_path)  # same folder, resume=auto
    assert resumed.state.global_step == 24
    ref_losses, losses = _losses(ref_out), _losses(tmp_path)
    assert sorted(losses) == list(range(1, 25))  # no step lost or repeated
    for step in range(1, 25):
        assert losses[step][1] == ref_losses[step][1]
        assert losses[step][0] == pytest.approx(ref_losses[step][0], abs=1e-5), f"step {step}"
    for name, p in ref.model.state_dict().items():
        assert torch.allclose(p, resumed.model.state_dict()[name], atol=1e-5), name


def test_reset_optimizer_matters(reference, tmp_path):
    """Guards the resume test: without the reset at stage boundaries the losses after the first boundary differ."""
    ref_out, _ = reference
    _run(tmp_path, "curriculum.reset_optimizer=false", "trainer.max_steps=10")
    ref_losses, losses = _losses(ref_out), _losses(tmp_path)
    assert losses[8][0] == pytest.approx(ref_losses[8][0], abs=1e-6)
    assert abs(losses[10][0] - ref_losses[10][0]) > 1e-5


def test_cli_train_then_eval(tmp_path, capsys):
    out = tmp_path / "run"
    args = [*TINY, "trainer.num_epochs=2", f"trainer.output_dir={out}"]
    assert main(["coconut", "train", *args]) == 0
    assert "stage 1: accuracy" in capsys.readouterr().out
    assert main(["coconut", "eval", *args, "eval.split=test", "eval.stage=1", "trainer.eval_batch_size=4"]) == 0
    result = json.loads((out / "eval-test-stage1.json").read_text())
    assert result["n"] == 6 and result["stage"] == 1 and 0.0 <= result["accuracy"] <= 1.0
    assert {r["latents"] for r in result["examples"]} == {2}
    # init_from: the checkpoint's weights start a new run
    ckpt = find_checkpoints(out)[-1]
    cfg = load_coconut_config(None, [*TINY, f"model.init_from={ckpt}", f"trainer.output_dir={tmp_path / 'next'}"])
    model = CoconutTrainer(cfg).model
    saved = load_file(str(ckpt / "model.safetensors"))
    assert all(torch.equal(model.state_dict()[k].cpu(), v) for k, v in saved.items())  # model on CUDA if any


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["coconut", "train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert main(["coconut", "eval", *TINY, f"trainer.output_dir={tmp_path}"]) == 2
    assert (
        main(
            ["coconut", "train", *TINY, "data.source=file", "data.train_file=x.txt", f"trainer.output_dir={tmp_path}"]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("thinkrl: error: ") for line in err)
    assert "does not exist" in err[0] and "no checkpoint" in err[1] and "x.txt does not exist" in err[2]


def test_pause_and_no_cot_modes_train(tmp_path):
    pause = _run(tmp_path / "pause", "curriculum.mode=pause", "trainer.num_epochs=2")
    assert sorted(pause.state.stage_results) == ["0", "1"]
    assert {r["latents"] for r in pause.evaluate("valid", 1)["examples"]} == {2}  # pause tokens in the prompt
    no_cot = _run(tmp_path / "no_cot", "curriculum.mode=no_cot", "trainer.num_epochs=1")
    assert sorted(no_cot.state.stage_results) == ["0"] and no_cot.state.global_step == 8
