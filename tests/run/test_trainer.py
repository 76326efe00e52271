"""The trainer end to end on tiny models: parameters move, resume is exact, NaN stops cleanly, run files exist."""

import errno
import importlib.util
import json
import resource
import signal
import subprocess
import sys

import pytest
import torch

from thinkrl.cli import main
from thinkrl.config import to_yaml
from thinkrl.errors import NonFiniteLossError
from thinkrl.run.state import find_checkpoints, is_storage_full
from thinkrl.run.trainer import Trainer


def _snapshot(trainer):
    return {
        f"{name}.{p_name}": p.detach().clone()
        for name, module in trainer.roles.modules().items()
        for p_name, p in module.named_parameters()
    }


@pytest.mark.parametrize(
    "groups, freeze, form",
    [("[A,B,C]", "[base]", "gate"), ("[A,A,A]", "[]", "mlp"), ("[A,B,A]", "[reasoner]", "concat")],
)
def test_two_steps_change_every_trainable_parameter_and_no_frozen_one(tiny_config, groups, freeze, form):
    cfg = tiny_config(
        f"model.weight_groups={groups}",
        f"model.freeze={freeze}",
        f"head.form={form}",
        "learner.lr=1e-2",
        "learner.base_weight=0.5",
        "trainer.dump_rollouts=false",
    )
    trainer = Trainer(cfg)
    before = _snapshot(trainer)
    trainable = {
        f"{name}.{p_name}"
        for name, module in trainer.roles.modules().items()
        for p_name, p in module.named_parameters()
        if p.requires_grad
    }
    trainer.step()
    trainer.step()
    after = _snapshot(trainer)
    frozen_roles = set(cfg.model.freeze)
    frozen_groups = {trainer.roles.role_group[r] for r in frozen_roles}
    for key, value in before.items():
        group = key.split(".")[0]
        if group in frozen_groups:
            assert key not in trainable and torch.equal(value, after[key]), f"frozen {key} changed"
        elif key in trainable:
            assert not torch.equal(value, after[key]), f"trainable {key} did not change"
    assert frozen_groups or all(k in trainable for k in before if k.split(".")[0] != "head" or form != "none")


def _loss_at(run_dir, step):
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["step"] == step and "train/loss" in record:
            return record["train/loss"], record["train/reward"]
    raise AssertionError(f"no train/loss at step {step}")


def test_resume_gives_the_same_next_step(tiny_config, tmp_path):
    common = ["trainer.save_every=2", "learner.lr=3e-3", "trainer.eval_every=0"]
    straight = tmp_path / "straight"
    Trainer(tiny_config(*common, "trainer.max_steps=3", f"trainer.output_dir={straight}")).train()
    interrupted = tmp_path / "interrupted"
    Trainer(tiny_config(*common, "trainer.max_steps=2", f"trainer.output_dir={interrupted}")).train()
    assert [p.name for p in find_checkpoints(interrupted)] == ["checkpoint-2"]
    resumed = Trainer(tiny_config(*common, "trainer.max_steps=3", f"trainer.output_dir={interrupted}"))
    resumed.train()
    assert resumed.state.step == 3
    assert _loss_at(straight, 3) == pytest.approx(_loss_at(interrupted, 3), abs=1e-6)
    assert _loss_at(straight, 2) == pytest.approx(_loss_at(interrupted, 2), abs=1e-6)


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tiny_config, tmp_path, capsys):
    run = tmp_path / "nan"
    cfg = tiny_config(
        "learner.lr=1e30",
        "learner.max_grad_norm=0",
        "trainer.save_every=1",
        "trainer.max_steps=5",
        f"trainer.output_dir={run}",
    )
    trainer = Trainer(cfg)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.train()
    message = str(info.value)
    assert "lower learner.lr" in message and "\n" not in message
    checkpoints = find_checkpoints(run)
    assert checkpoints, "the checkpoint written before the NaN must survive"
    assert f"{checkpoints[-1]} is intact" in message
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    assert state["step"] == int(checkpoints[-1].name.split("-")[1])
    assert not list(run.glob(".tmp-*")), "no half-written checkpoint left behind"


def _file_size_limit(limit: int):
    """In the child: writes past ``limit`` bytes fail with EFBIG (``ulimit -f``) instead of killing the process."""

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_disk_stops_in_one_line_and_keeps_the_last_checkpoint(tiny_config, tmp_path):
    assert is_storage_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_storage_full(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert not is_storage_full(OSError(errno.EACCES, "Permission denied")) and not is_storage_full(ValueError("x"))

    run = tmp_path / "full"
    settings = ["trainer.save_every=1", "trainer.report_to=none", "trainer.num_threads=1", f"trainer.output_dir={run}"]
    Trainer(tiny_config(*settings, "trainer.max_steps=2")).train()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(to_yaml(tiny_config(*settings, "trainer.max_steps=4")))
    # A real refused write: the tiny model's weights (about 90 KB) exceed a 64 KB file-size limit, the run's metric
    # lines do not.
    failed = subprocess.run(
        [sys.executable, "-m", "thinkrl", "train", "--config", str(recipe), "trainer.progress=false"],
        capture_output=True,
        text=True,
        preexec_fn=_file_size_limit(64 * 1024),
        timeout=300,
    )
    assert failed.returncode == 2, failed.stderr[-2000:]
    error = failed.stderr.strip().splitlines()[-1]
    assert error.startswith(f"thinkrl: error: writing {run / 'checkpoint-3'} failed:") and "File too large" in error
    assert "trainer.keep_checkpoints=1" in error and "resume from checkpoint-2" in error
    assert [p.name for p in find_checkpoints(run)] == ["checkpoint-1", "checkpoint-2"]
    assert not list(run.glob(".tmp-*")), "the half-written checkpoint is removed, freeing its space"

    Trainer(tiny_config(*settings, "trainer.max_steps=4")).train()  # space again: the same command resumes
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/reward" in r] == [1, 2, 3, 4]  # step 3's stale line was replaced
    assert json.loads((run / "summary.json").read_text())["steps"] == 4


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_run_folder_contents_and_wandb_offline(tiny_config, tmp_path):
    run = tmp_path / "files"
    cfg = tiny_config("trainer.max_steps=2", "trainer.report_to=wandb", f"trainer.output_dir={run}")
    Trainer(cfg).train()
    assert (run / "config.yaml").read_text().startswith("model:")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {m["step"] for m in metrics} == {0, 1, 2}
    assert any("timing/rollout" in m for m in metrics)
    dump = [json.loads(line) for line in (run / "rollouts" / "step-000002.jsonl").read_text().splitlines()]
    assert len(dump) == cfg.trainer.batch_positions and len(dump[0]["thoughts"]) == cfg.rollout.num_thoughts
    assert {"text", "reward", "advantage", "per_token_reward"} <= set(dump[0]["thoughts"][0])
    summary = json.loads((run / "summary.json").read_text())
    for key in ("reward_mean", "nll_thought", "nll_null", "nll_base", "null_rate", "thought_len_mean"):
        assert isinstance(summary["initial_eval"][key], float) and isinstance(summary["final_eval"][key], float)
    assert "| reward_mean |" in (run / "results.md").read_text()
    assert list((run / "wandb").glob("offline-run-*")), "wandb should log offline into the run folder"
    assert [p.name for p in find_checkpoints(run)] == ["checkpoint-2"]


def test_cli_train_prints_the_gain(tmp_path, capsys):
    code = main(
        [
            "train",
            "--config",
            "configs/default.yaml",
            f"trainer.output_dir={tmp_path / 'cli'}",
            "trainer.max_steps=1",
            "trainer.lm_warmup_steps=1",
            "trainer.report_to=none",
            "data.eval_positions=4",
            "trainer.progress=false",
        ]
    )
    assert code == 0
    assert "reward_mean" in capsys.readouterr().out


def test_lora_roles_train_adapters_and_marker_embeddings_only(tiny_config):
    cfg = tiny_config(
        "model.default.lora.r=4",
        "model.weight_groups=[A,A,A]",
        "head.form=gate",
        "learner.lr=1e-2",
        "trainer.dump_rollouts=false",
    )
    trainer = Trainer(cfg)
    model = trainer.roles.model("reasoner")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "token_adapter" in n or "trainable_tokens" in n for n in trainable), (
        trainable
    )
    trainer.step()
    trainer.step()
    for name, param in model.named_parameters():
        assert torch.equal(before[name], param) != (name in trainable), name


def test_reasoner_template_wraps_what_the_reasoner_reads(tiny_config, tmp_path):
    """With rollout.reasoner_template the actor and the policy gradient see the wrapped context; the
    interpreter still reads the bare one."""
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat and the dog sat on the log. " * 30)
    cfg = tiny_config(
        "model.tokenizer=byte",
        "data.source=text",
        f"data.train_file={text}",
        "data.positions=every_k",
        "data.context_len=24",
        "model.default.scratch.max_position_embeddings=2048",
        "rollout.reasoner_template=thinking/system",
    )
    trainer = Trainer(cfg)
    seen, bare = [], []
    sample, score = trainer.actor.sample, trainer.scorer.score
    trainer.actor.sample = lambda contexts, k, seeds: seen.append(contexts) or sample(contexts, k, seeds)
    trainer.scorer.score = lambda contexts, *a: bare.append(contexts) or score(contexts, *a)
    trainer.step()
    wrap = trainer.reasoner_prompt
    assert len(wrap.prefix) > 100 and not wrap.suffix  # system text and "Text:" before the context
    assert seen[0] == [wrap.wrap(c) for c in bare[0]] and seen[0] != bare[0]
