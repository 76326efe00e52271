"""The trainer end to end on tiny models: parameters move, resume is exact, NaN stops cleanly, run files exist."""

import errno
import importlib.util
import json
import resource
import shutil
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


def _step_record(run_dir, step):
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["step"] == step and "train/loss" in record:
            return record
    raise AssertionError(f"no train/loss at step {step}")


RESUME = ["trainer.save_every=1", "learner.lr=3e-3", "learner.scheduler=cosine", "trainer.max_steps=3"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """Three steps under a cosine schedule, a checkpoint after each (2 and 3 kept): the uninterrupted reference."""
    from conftest import TINY

    from thinkrl.config import load_config

    out = tmp_path_factory.mktemp("straight") / "run"
    Trainer(load_config(None, [*TINY, *RESUME, f"trainer.output_dir={out}"])).train()
    return out


def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_weights_moments_and_schedule(
    tiny_config, tmp_path, straight_run
):
    from checkpoints import assert_same_state

    # killed after checkpoint-2 was written: step 3's metrics and the final evaluation are stale lines now
    killed = tmp_path / "killed"
    shutil.copytree(straight_run, killed)
    shutil.rmtree(killed / "checkpoint-3")
    resumed = Trainer(tiny_config(*RESUME, f"trainer.output_dir={killed}"))
    resumed.train()
    assert resumed.state.step == 3
    # the state after the resumed step's AdamW update and LR step: weights, both moments and the next lr
    assert_same_state(killed / "checkpoint-3", straight_run / "checkpoint-3", exact=True)
    a, b = _step_record(killed, 3), _step_record(straight_run, 3)
    assert a["train/lr"] == b["train/lr"] < _step_record(straight_run, 2)["train/lr"]  # cosine: it moved
    assert (a["train/loss"], a["train/reward"]) == (b["train/loss"], b["train/reward"])
    assert sum(1 for line in (killed / "metrics.jsonl").read_text().splitlines() if '"step": 3,' in line) == len(
        [line for line in (straight_run / "metrics.jsonl").read_text().splitlines() if '"step": 3,' in line]
    ), "the stale lines of step 3 are replaced, not doubled"


def test_nan_loss_stops_before_any_update_and_the_kept_checkpoint_resumes(
    tiny_config, tmp_path, straight_run, monkeypatch
):
    """A NaN in the loss itself (patched in at step 3, normal lr): stop before backward and optimizer step, keep
    checkpoint-2 whole, and the same command resumes from it once the loss is finite again."""
    from checkpoints import trained_state

    import thinkrl.run.trainer as trainer_module
    from thinkrl.distributed.checkpoint import container

    run = tmp_path / "nan"
    real = trainer_module.compute_loss

    def loss_nan_at_step_3(*args, **kwargs):
        out = real(*args, **kwargs)
        if trainer.state.step == 2:  # two steps done: this is step 3's loss
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer_module, "compute_loss", loss_nan_at_step_3)
    trainer = Trainer(tiny_config(*RESUME, f"trainer.output_dir={run}"))
    with pytest.raises(NonFiniteLossError) as info:
        trainer.train()
    message = str(info.value)
    assert message.startswith("loss is nan at step 3;") and "\n" not in message
    assert "lower learner.lr" in message and f"{run / 'checkpoint-2'} is intact" in message
    assert [c.name for c in find_checkpoints(run)] == ["checkpoint-1", "checkpoint-2"]
    assert not list(run.glob(".tmp-*")), "no half-written checkpoint left behind"
    # in memory nothing moved since checkpoint-2 (no backward into .grad, no AdamW step), and no gradient is left
    saved = trained_state(run / "checkpoint-2")
    names = {n: p for n, p in container(trainer.roles).named_parameters() if p.requires_grad}
    assert {k.split(":", 1)[1] for k in saved if k.startswith("weight:")} == names.keys()
    for name, p in names.items():
        assert torch.equal(p.detach(), saved[f"weight:{name}"]), name
        assert p.grad is None, name
    # the uninterrupted run is identical up to its checkpoint-2; the resume from the kept one trains to its end
    monkeypatch.setattr(trainer_module, "compute_loss", real)
    Trainer(tiny_config(*RESUME, f"trainer.output_dir={run}")).train()
    assert [c.name for c in find_checkpoints(run)] == ["checkpoint-2", "checkpoint-3"]
    assert _step_record(run, 3)["train/loss"] == _step_record(straight_run, 3)["train/loss"]


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


def test_export_of_a_lora_run_merges_the_adapters_into_plain_weights(tiny_config, tmp_path):
    """``thinkrl export``: a LoRA group becomes a plain HF model whose logits are the adapted model's."""
    from transformers import AutoModelForCausalLM

    from thinkrl.export import export_checkpoint

    cfg = tiny_config(
        "model.default.lora.r=4", "model.weight_groups=[A,A,A]", "learner.lr=1e-2", "trainer.max_steps=2"
    )
    trainer = Trainer(cfg)
    trainer.train()
    out = export_checkpoint(find_checkpoints(trainer.run_dir)[-1], tmp_path / "exported")
    plain = AutoModelForCausalLM.from_pretrained(out / "A")
    assert not any("lora" in name for name in plain.state_dict()), "adapters left unmerged"
    adapted = trainer.roles.model("reasoner")
    adapted.eval()
    ids = torch.tensor([[1, 5, 6, 7, 8, trainer.roles.sot_id, 9, trainer.roles.eot_id]])
    with torch.no_grad():
        want = adapted(input_ids=ids).logits
        got = plain(input_ids=ids).logits
        with adapted.disable_adapter():
            without = adapted(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    assert float((without - want).abs().max()) > 1e-3, "the adapters changed nothing: the check above proves little"


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


def test_the_final_evaluation_in_summary_json_equals_a_recomputation_from_the_scorer(straight_run, tmp_path):
    """summary.json's final_eval, recomputed position by position from the final checkpoint: the same held-out
    positions and sampling seeds, the Scorer's log-probs, and the metric formulas written out by hand."""
    from thinkrl.data.sources import build_pools
    from thinkrl.eval.setup import load_setup
    from thinkrl.prompts import null_thought_ids, reasoner_prompt, wrap_contexts
    from thinkrl.rl.scoring import Scorer
    from thinkrl.rollout import make_actor
    from thinkrl.rollout.policy import position_seeds

    setup = load_setup(str(straight_run / "checkpoint-3"), None, [])
    cfg, roles = setup.cfg, setup.roles
    assert cfg.reward.discount == 1.0 and not cfg.parallel_passes()  # what the hand formulas below assume
    tok, k, step = roles.tokenizer, cfg.rollout.num_thoughts, cfg.trainer.batch_positions
    _, pool = build_pools(cfg.data, tok, cfg.trainer.seed)
    scorer = Scorer(roles, null_thought_ids(cfg.rollout.null_thought, tok), cfg.data.interpreter_window, "mixed")
    assert cfg.reward.source == "mixed"
    actor = make_actor(cfg.rollout, roles, tmp_path, 64)
    prompt = reasoner_prompt(cfg.rollout.reasoner_template, tok)
    generator = torch.Generator().manual_seed(cfg.trainer.seed + 12345)  # the trainer's evaluation seed
    for module in roles.modules().values():
        module.eval()
    n = min(len(pool), cfg.data.eval_positions)
    thought, null, base, best, reward, beaten, weight, lengths, unfinished, tokens = ([] for _ in range(10))
    copies, copies_whole = [], []  # per thought: y_1 among its tokens; y_1..y_n as a contiguous run
    with torch.no_grad():
        for start in range(0, n, step):
            positions = [pool[i] for i in range(start, min(n, start + step))]
            contexts, targets = [p.context_ids for p in positions], [p.target_ids for p in positions]
            thoughts = actor.sample(wrap_contexts(prompt, contexts), k, position_seeds(len(contexts), generator))
            s = scorer.score(contexts, targets, thoughts)
            for i in range(len(positions)):
                m = s.target_mask[i]
                totals = [float(s.logp[i, j][m].sum()) for j in range(k)]
                null_total = float(s.logp[i, k][m].sum())
                thought += totals
                null.append(null_total)
                base.append(float(s.logp_base[i][m].sum()))
                best.append(max(totals))
                reward += [t - null_total for t in totals]
                beaten.append(max(totals) > null_total)
                weight += [float(s.weight[i, j][m].sum()) for j in range(k)]
                lengths += thoughts.lengths[i].tolist()
                unfinished += (~thoughts.finished[i]).tolist()
                tokens.append(int(m.sum()))
                y = targets[i]
                for j in range(k):
                    z = thoughts.thought_ids[i, j, : int(thoughts.lengths[i, j])].tolist()
                    copies.append(y[0] in z)
                    copies_whole.append(any(z[s : s + len(y)] == y for s in range(len(z))))
    t = sum(tokens)
    want = {
        "nll_thought": -sum(thought) / (t * k),
        "nll_best": -sum(best) / t,
        "nll_null": -sum(null) / t,
        "nll_base": -sum(base) / t,
        "reward_mean": sum(reward) / len(reward),
        "null_rate": 1 - sum(beaten) / len(beaten),
        "thought_len_mean": sum(lengths) / len(lengths),
        "unfinished_rate": sum(unfinished) / len(unfinished),
        "mix_weight": sum(weight) / (t * k),
        "copy_rate": sum(copies) / len(copies),
        "copy_rate_target": sum(copies_whole) / len(copies_whole),
        "copy_rate_null": 0.0,  # the empty null thought has no token to copy
        "reward_copy_share": sum(max(r, 0) for r, c in zip(reward, copies) if c) / sum(max(r, 0) for r in reward),
    }
    got = json.loads((straight_run / "summary.json").read_text())["final_eval"]
    assert got["positions"] == n == len(null)
    for key, value in want.items():
        # reward_copy_share divides sums of rewards of ~1e-3 nats, whose float error is ~1e-4 of them
        assert got[key] == pytest.approx(value, rel=1e-3 if key == "reward_copy_share" else 1e-5, abs=1e-7), key
    assert 0 < want["null_rate"] < 1 and want["nll_best"] < want["nll_thought"]  # not a comparison of constants


def test_training_metrics_and_rollout_dumps_carry_the_copy_gauge(straight_run):
    """Each RL step logs copy_rate, copy_rate_target and reward_copy_share: the rollout dump of the same step (one
    micro-batch) flags the same thoughts; the held-out evaluations (step 0: the chance level) report them too."""
    shares = []
    for step in (1, 2, 3):
        record = _step_record(straight_run, step)
        shares.append(record["train/reward_copy_share"])
        dump = [json.loads(x) for x in (straight_run / "rollouts" / f"step-{step:06d}.jsonl").read_text().splitlines()]
        thoughts = [t for position in dump for t in position["thoughts"]]
        assert record["train/copy_rate"] == pytest.approx(sum(t["copies_first"] for t in thoughts) / len(thoughts))
        assert record["train/copy_rate_target"] == pytest.approx(
            sum(t["copies_target"] for t in thoughts) / len(thoughts)
        )
        positive = sum(max(t["reward"], 0) for t in thoughts)
        copied = sum(max(t["reward"], 0) for t in thoughts if t["copies_first"])
        want = copied / positive if positive else 0.0  # the dump rounds rewards (~1e-3 nats here) to 5 decimals
        assert record["train/reward_copy_share"] == pytest.approx(want, rel=2e-2, abs=1e-4)
    assert max(shares) > 0  # some copying thought earned a positive reward: not a comparison of zeros
    summary = json.loads((straight_run / "summary.json").read_text())
    for stage in ("initial_eval", "final_eval"):
        assert {"copy_rate", "copy_rate_target", "copy_rate_null", "reward_copy_share"} <= set(summary[stage])
    assert "| copy_rate |" in (straight_run / "results.md").read_text()


def _summary(run):
    return json.loads((run / "summary.json").read_text())["final_eval"]


@pytest.mark.parametrize("damage", ["truncate-weights", "delete-optimizer"])
def test_a_broken_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(
    tiny_config, tmp_path, straight_run, caplog, damage
):
    """checkpoint-3 damaged as after a disk crash or an interrupted copy: the same command logs one line, keeps the
    broken folder as checkpoint-3.broken, resumes from checkpoint-2 and ends with the uninterrupted run's result."""
    import logging

    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    newest = run / "checkpoint-3"
    if damage == "truncate-weights":
        weights = newest / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        (newest / "optimizer.bin").unlink()
    with caplog.at_level(logging.WARNING, logger="thinkrl.run.state"):
        Trainer(tiny_config(*RESUME, f"trainer.output_dir={run}")).train()
    lines = [r.getMessage() for r in caplog.records if "broken" in r.getMessage()]
    assert len(lines) == 1 and "checkpoint-3" in lines[0] and "resuming from checkpoint-2" in lines[0], lines
    assert ("model.safetensors" if damage == "truncate-weights" else "optimizer.bin") in lines[0]
    assert (run / "checkpoint-3.broken").is_dir() and [c.name for c in find_checkpoints(run)] == [
        "checkpoint-2",
        "checkpoint-3",
    ]
    assert _summary(run) == _summary(straight_run)


def test_broken_checkpoints_give_one_line_errors_and_nothing_is_changed(tiny_config, tmp_path, straight_run):
    from thinkrl.errors import ConfigError
    from thinkrl.eval.setup import load_setup
    from thinkrl.export import export_checkpoint

    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    for step in (2, 3):
        (run / f"checkpoint-{step}" / "optimizer.bin").unlink()
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    for attempt in (
        lambda: Trainer(tiny_config(*RESUME, "trainer.max_steps=4", f"trainer.output_dir={run}")),
        lambda: load_setup(str(run / "checkpoint-3"), None, []),
        lambda: export_checkpoint(run / "checkpoint-3", tmp_path / "exported"),
    ):
        with pytest.raises(ConfigError) as info:
            attempt()
        message = str(info.value)
        assert "\n" not in message and "optimizer.bin is missing" in message, message
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    assert not (tmp_path / "exported").exists()
