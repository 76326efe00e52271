"""FSDP2 sharding (trainer.sharding=fsdp2): real `accelerate launch`-ed processes (gloo on CPU) that call
fully_shard themselves, against a 1-process unsharded run with the same global batch; sharded checkpoints that
resume under other process counts and in the other mode; export and evaluation of sharded checkpoints (streamed:
one tensor at a time, no model built for export, models on the meta device for evaluation). The sharded runs keep
an EMA reference (reward.baseline=ema, sharded like its model): with leave-one-out advantages its per-position
reference cancels, so their updates still equal the unsharded run's, and its own weights are checked in every
checkpoint and resume. The RLP recipe (configs/rlp/) trains in 2 processes with its vLLM engines."""

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import assert_same_state, trained_state
from launching import ONE, ROOT, ok, step_metrics, train, two_processes
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedModel

from thinkrl.distributed.sharding import decoder_layers, vllm_memory_need
from thinkrl.errors import ConfigError
from thinkrl.run.state import find_checkpoints


def _unsharded_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """accelerate's files of an unsharded run: models by group (A, B), then the head, as the trainer prepared them."""
    names = ["A", "B", "head"]
    files = ["model.safetensors", "model_1.safetensors", "model_2.safetensors"]
    return {f"{n}.{k}": v for n, f in zip(names, files) for k, v in load_file(ckpt / f).items()}


def _exported_weights(ckpt: Path, out: Path) -> dict[str, torch.Tensor]:
    from thinkrl.export import export_checkpoint

    export_checkpoint(ckpt, out)
    weights = {f"head.{k}": v for k, v in load_file(out / "head.safetensors").items()}
    for group in ("A", "B"):
        model = AutoModelForCausalLM.from_pretrained(out / group)
        weights.update({f"{group}.{k}": v for k, v in model.state_dict().items()})
    return weights


# The sharded runs' reward reference: an EMA of the interpreter that moves half way each step, so a wrong restore or
# update shows in its weights.
EMA = ["reward.baseline=ema", "reward.ema_decay=0.5"]


def _resume_from(run: Path, step: int, dest: Path) -> Path:
    """A copy of ``run`` holding only its checkpoint-<step> (the next run resumes there)."""
    shutil.copytree(run, dest)
    for ckpt in dest.glob("checkpoint-*"):
        if ckpt.name != f"checkpoint-{step}":
            shutil.rmtree(ckpt)
    return dest


@pytest.fixture(scope="module")
def runs(tmp_path_factory, single_run):
    """Two steps each, a checkpoint after every step: 1 process unsharded, and 2 processes with FSDP2 and the EMA
    reward reference."""
    root = tmp_path_factory.mktemp("sharding")
    sharded = root / "sharded"
    ok(train(two_processes(), sharded, "trainer.max_steps=2", "trainer.sharding=fsdp2", *EMA))
    return root, single_run, sharded


@pytest.mark.slow
def test_fsdp2_in_two_processes_equals_one_unsharded_process(runs):
    root, single, sharded = runs
    a, b = step_metrics(single, 1), step_metrics(sharded, 1)
    grad_keys = [k for k in a if k.startswith("train/grad_norm/")]
    assert len(grad_keys) == 3  # model A, model B, head
    # train/reward is measured against the EMA here, the null thought there; losses and gradients do not see it
    for key in ("train/loss", "train/null_rate", "train/grad_norm", "train/policy_loss", *grad_keys):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key
    # Each process holds about half of every sharded model (dim-0 shards; tensors with an odd first dimension
    # put the extra row on rank 0), and together exactly all of it.
    shards = [json.loads((sharded / f"rank{r}" / "shards.json").read_text()) for r in (0, 1)]
    for name in ("A", "B", "head"):
        full = shards[0][name]["full"]
        assert shards[0][name]["local"] + shards[1][name]["local"] == full, name
        if name != "head":  # the gate head is one 64→1 linear layer: its bias has a single element
            assert all(abs(s[name]["local"] / full - 0.5) < 0.01 for s in shards), name
    # Weights after one and two AdamW steps. Adam moves every coordinate by about lr·sign(g) whatever |g| is, so
    # where a gradient cancels to ~0 its float noise decides the step: a handful of elements (5 of 270k at step 1
    # here, all in the reasoner) differ by up to a fraction of lr; every other element agrees within 1e-5.
    for step in (1, 2):
        wa = _unsharded_weights(single / f"checkpoint-{step}")
        wb = _exported_weights(sharded / f"checkpoint-{step}", root / f"export-{step}")
        assert wa.keys() == wb.keys()
        diffs = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
        assert float((diffs > 1e-5).float().mean()) < 1e-4, step
        assert float(diffs.max()) <= 1e-3, step
        assert float(diffs[diffs <= 1e-5].mean()) < 1e-8, step  # the rest at float noise (outliers dominate a mean)
    # The EMA copy of the interpreter (group A), updated shard by shard: after step 2 it is half way between its
    # step-1 weights and the live step-2 weights, element for element.
    ema = [trained_state(sharded / f"checkpoint-{step}") for step in (1, 2)]
    names = [k.split(":", 1)[1] for k in ema[1] if k.startswith("ema:")]
    assert names and all(f"weight:A.{n}" in ema[1] for n in names)
    for name in names:
        want = torch.lerp(ema[0][f"ema:{name}"], ema[1][f"weight:A.{name}"], 0.5)
        torch.testing.assert_close(ema[1][f"ema:{name}"], want, rtol=0, atol=1e-7)
    assert not torch.equal(ema[0][f"ema:{names[0]}"], ema[1][f"ema:{names[0]}"])


@pytest.mark.slow
def test_sharded_checkpoint_resumes_in_one_process_and_in_two(runs):
    """Resumed at checkpoint-1, step 2 ends where the uninterrupted runs' step 2 ends: weights, AdamW moments, the
    EMA reference's weights and the linear schedule's next lr, read from the checkpoints written after the update."""
    root, single, sharded = runs
    unsharded_one = _resume_from(sharded, 1, root / "resume-one")
    ok(train(ONE, unsharded_one, "trainer.max_steps=2", *EMA))  # sharded → unsharded, 2 → 1 process
    for reference in (sharded, single):  # the EMA weights against the sharded run's (the unsharded one has none)
        for key in ("train/loss", "train/lr"):
            assert step_metrics(unsharded_one, 2)[key] == pytest.approx(step_metrics(reference, 2)[key], rel=1e-4)
        assert_same_state(unsharded_one / "checkpoint-2", reference / "checkpoint-2")
    # the reward after the resumed update is measured against the EMA restored from the shards
    assert step_metrics(unsharded_one, 2)["train/reward"] == pytest.approx(
        step_metrics(sharded, 2)["train/reward"], rel=1e-4
    )
    # 2 → 2, the newest checkpoint broken as after a disk crash: one rank's shard file of checkpoint-2 cut in half.
    # Both processes agree on checkpoint-1, checkpoint-2 is kept aside as checkpoint-2.broken with one log line.
    sharded_two = root / "resume-two"
    shutil.copytree(sharded, sharded_two)
    shard = sorted((sharded_two / "checkpoint-2" / "sharded").glob("__1_*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    done = train(two_processes(), sharded_two, "trainer.max_steps=2", "trainer.sharding=fsdp2", *EMA)
    ok(done)
    warned = [line for line in done.stderr.splitlines() if "is broken" in line]
    assert len(warned) == 1 and shard.name in warned[0] and "resuming from checkpoint-1" in warned[0], warned
    assert (sharded_two / "checkpoint-2.broken" / "sharded" / shard.name).is_file()
    final = json.loads((sharded_two / "summary.json").read_text())["final_eval"]
    assert final == json.loads((sharded / "summary.json").read_text())["final_eval"]
    for key in ("train/loss", "train/grad_norm", "train/reward", "train/lr"):
        assert step_metrics(sharded_two, 2)[key] == step_metrics(sharded, 2)[key], key
    # same processes: bitwise, the EMA reference's shards included
    assert_same_state(sharded_two / "checkpoint-2", sharded / "checkpoint-2", exact=True)


@pytest.mark.slow
def test_unsharded_checkpoint_resumes_sharded(runs):
    root, single, _ = runs
    resumed = _resume_from(single, 1, root / "to-sharded")
    ok(train(ONE, resumed, "trainer.max_steps=2", "trainer.sharding=fsdp2"))  # one process, its own group
    assert (resumed / "checkpoint-2" / "sharded" / ".metadata").is_file()
    for key in ("train/loss", "train/grad_norm", "train/reward", "train/lr"):
        assert step_metrics(resumed, 2)[key] == pytest.approx(step_metrics(single, 2)[key], rel=1e-4), key
    assert_same_state(resumed / "checkpoint-2", single / "checkpoint-2")


@pytest.mark.slow
def test_eval_loads_a_sharded_checkpoint_and_a_mismatched_run_gets_one_line(runs):
    from thinkrl.eval.setup import load_setup

    root, single, sharded = runs
    ckpt = sharded / "checkpoint-2"
    setup = load_setup(str(ckpt), None, [])
    # the evaluated weights are the checkpoint's, as DCP's own offline reader sees them (no thinkrl code) ...
    saved = trained_state(ckpt)
    loaded = {
        f"{g}.{k}": v
        for g, m in [*setup.roles.models.items(), ("head", setup.roles.head)]
        for k, v in m.named_parameters()
    }
    names = [k.split(":", 1)[1] for k in saved if k.startswith("weight:")]
    assert names and set(names) <= loaded.keys()
    for name in names:
        assert torch.equal(loaded[name].detach(), saved[f"weight:{name}"]), name
    # ... and those of the unsharded 1-process run after the same two steps, to float noise
    reference = _unsharded_weights(single / "checkpoint-2")
    diffs = torch.cat([(loaded[k].detach() - reference[k]).abs().flatten() for k in names])
    assert float(diffs[diffs <= 1e-5].mean()) < 1e-8 and float(diffs.max()) <= 1e-3
    assert float((diffs > 1e-5).float().mean()) < 1e-4
    # resuming with other model sizes: the recorded recipe refuses it in one line naming the key, nothing overwritten
    other = _resume_from(sharded, 2, root / "mismatch")
    recorded = (other / "config.yaml").read_text()
    done = train(ONE, other, "trainer.max_steps=3", "model.default.scratch.intermediate_size=128", *EMA)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert "model.default.scratch.intermediate_size (256 → 128)" in last and "output_dir" in last
    assert (other / "config.yaml").read_text() == recorded
    # without a recorded recipe the sharded checkpoint itself says it does not fit
    (other / "config.yaml").unlink()
    done = train(ONE, other, "trainer.max_steps=3", "model.default.scratch.intermediate_size=128", *EMA)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("thinkrl: error: checkpoint ") and "does not fit" in last and "output_dir" in last
    assert (other / "checkpoint-2" / "sharded" / ".metadata").is_file()


def _folder_differences(a: Path, b: Path) -> list[str]:
    """Files that differ between two exports, byte for byte (roles.json's checkpoint path and the stamp aside)."""
    names = [
        sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
        for root in (a, b)
    ]
    assert names[0] == names[1]
    found = []
    for name in names[0]:
        if name == "roles.json":
            ra, rb = (json.loads((root / name).read_text()) for root in (a, b))
            found += [name] if {**ra, "checkpoint": ""} != {**rb, "checkpoint": ""} else []
        elif (a / name).read_bytes() != (b / name).read_bytes():
            found.append(name)
    return found


class _LiveReads:
    """Wraps ``ShardedTensors.read``: the peak of bytes read from the checkpoint and still alive at once."""

    def __init__(self, monkeypatch):
        import weakref

        from thinkrl.distributed.checkpoint import ShardedTensors

        self.live = self.peak = 0
        read = ShardedTensors.read

        def tracked(reader, name, into=None):
            out = read(reader, name, into)
            if into is None:
                size = out.numel() * out.element_size()
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(out, self._freed, size)
            return out

        monkeypatch.setattr(ShardedTensors, "read", tracked)

    def _freed(self, size: int) -> None:
        self.live -= size


def _whole_export(ckpt: Path, out: Path, max_shard_size) -> None:
    """The reference: models built whole and filled, LoRA merged by peft, saved by transformers."""
    from thinkrl.export import _write_whole

    out.mkdir()
    role_group, head_form = _write_whole(ckpt, out, max_shard_size)
    (out / "roles.json").write_text(json.dumps({"roles": role_group, "head_form": head_form}, indent=2))


def _meta_roles(ckpt: Path):
    """The run's roles with every parameter on the meta device (buffers real), as ``build_roles(meta=True)`` builds
    a model with a path, then filled from the sharded checkpoint as ``thinkrl eval`` fills them."""
    from accelerate import init_empty_weights

    from thinkrl.config import load_config
    from thinkrl.distributed.checkpoint import fill_from_sharded
    from thinkrl.models.roles import build_roles

    with init_empty_weights(include_buffers=False):
        roles = build_roles(load_config(ckpt.parent / "config.yaml"))
    assert all(p.is_meta for m in roles.modules().values() for p in m.parameters())
    fill_from_sharded(ckpt, roles, torch.device("cpu"))
    return roles


def _assert_same_roles(got, want) -> None:
    for name, module in want.modules().items():
        a, b = got.modules()[name].state_dict(), module.state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
        bufs = dict(got.modules()[name].named_buffers())
        assert all(torch.equal(bufs[k], v) for k, v in module.named_buffers()), name


@pytest.mark.slow
def test_export_of_a_sharded_checkpoint_streams_one_tensor_at_a_time_and_equals_the_whole_export(
    runs, tmp_path, monkeypatch
):
    """The streamed export (no model built) writes the same files as whole models saved by transformers, byte for
    byte, split past max_shard_size into the files and index save_pretrained names; the exporter never holds more
    than one checkpoint tensor at a time; transformers loads the folders and gives the evaluated model's logits."""
    from thinkrl.eval.setup import load_setup
    from thinkrl.export import export_checkpoint

    _, _, sharded = runs
    ckpt = sharded / "checkpoint-2"
    _whole_export(ckpt, tmp_path / "whole", 100_000)
    reads = _LiveReads(monkeypatch)
    export_checkpoint(ckpt, tmp_path / "streamed", max_shard_size=100_000)
    assert not _folder_differences(tmp_path / "whole", tmp_path / "streamed")
    files = sorted(p.name for p in (tmp_path / "streamed" / "A").glob("model*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors", files
    index = json.loads((tmp_path / "streamed" / "A" / "model.safetensors.index.json").read_text())
    largest = max(v.numel() * v.element_size() for f in files for v in load_file(tmp_path / "streamed/A" / f).values())
    assert set(index["weight_map"].values()) == set(files)
    assert 0 < reads.peak <= largest < index["metadata"]["total_size"] / 4  # one tensor, not one file or model
    # evaluation's roles (filled from the same checkpoint) and the exported folders: the same logits
    roles = load_setup(str(ckpt), None, []).roles
    ids = torch.tensor([[1, 5, 7, 3, 9, 2]])
    for group in ("A", "B"):
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed" / group).eval()
        with torch.no_grad():
            assert torch.equal(exported(ids).logits, roles.models[group].eval()(ids).logits), group


@pytest.mark.slow
def test_eval_fills_meta_models_from_a_sharded_checkpoint(runs):
    """Models built without weights (meta device, real buffers) get empty storage and every tensor from the
    checkpoint, one at a time: the same as whole models filled from it."""
    from thinkrl.eval.setup import load_setup

    _, _, sharded = runs
    ckpt = sharded / "checkpoint-2"
    _assert_same_roles(_meta_roles(ckpt), load_setup(str(ckpt), None, []).roles)


@pytest.mark.slow
def test_init_from_a_sharded_run_takes_its_weights(runs, tmp_path):
    """``model.init_from`` reads a sharded source one tensor at a time into an unsharded run's models and head."""
    from thinkrl.config import load_config
    from thinkrl.eval.setup import load_setup
    from thinkrl.models.roles import build_roles
    from thinkrl.run.init_from import load_initial_weights

    _, _, sharded = runs
    cfg = load_config(sharded / "config.yaml", [f"model.init_from={sharded}", f"trainer.output_dir={tmp_path}"])
    roles = build_roles(cfg)
    assert load_initial_weights(cfg, roles).name == "checkpoint-2"
    _assert_same_roles(roles, load_setup(str(sharded / "checkpoint-2"), None, []).roles)


@pytest.mark.slow
def test_lora_sharded_checkpoint_exports_merged_and_evaluates_from_the_meta_device(tmp_path):
    """A 1-process fsdp2 LoRA run: the streamed export merges each layer's adapter (W + B·A·alpha/r) and the
    markers' trainable rows as peft's merge_and_unload does, bit for bit; meta-device evaluation fills the peft
    models (base layers, adapters, marker rows and peft's unsaved original rows) as whole ones are filled."""
    from thinkrl.eval.setup import load_setup
    from thinkrl.export import export_checkpoint

    run = tmp_path / "lora"
    ok(train(ONE, run, "trainer.max_steps=1", "trainer.sharding=fsdp2", "model.default.lora.r=4"))
    ckpt = run / "checkpoint-1"
    _whole_export(ckpt, tmp_path / "whole", "50GB")
    export_checkpoint(ckpt, tmp_path / "streamed")
    assert not _folder_differences(tmp_path / "whole", tmp_path / "streamed")
    assert sorted(p.name for p in (tmp_path / "streamed" / "A").iterdir() if "model" in p.name) == [
        "model.safetensors"
    ]
    merged = load_file(tmp_path / "streamed" / "A" / "model.safetensors")
    whole = load_setup(str(ckpt), None, []).roles
    base = whole.models["A"].base_model.model.model
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], base.layers[0].self_attn.q_proj.weight)
    _assert_same_roles(_meta_roles(ckpt), whole)


def test_decoder_layers_of_an_unknown_model_class_is_a_config_error():
    class Bare(PreTrainedModel):  # no GradientCheckpointingLayer inside
        _no_split_modules = None

    from transformers import PretrainedConfig

    with pytest.raises(ConfigError, match="trainer.sharding=none"):
        decoder_layers(Bare(PretrainedConfig()))


def test_decoder_layers_finds_every_layer_of_a_llama(tiny_config):
    from thinkrl.models.roles import build_roles

    model = build_roles(tiny_config()).models["A"]
    layers = decoder_layers(model)
    assert layers == list(model.model.layers)


def test_vllm_memory_need_hand_values():
    # 1e9 parameters over 8 processes: 16 bytes each sharded (2e9) + the model gathered in bf16 (2e9)
    assert vllm_memory_need(1_000_000_000, 8, 2) == 4_000_000_000
    assert vllm_memory_need(10, 1, 4) == 200


def _rlp_recipe(folder: Path) -> list[str]:
    """configs/rlp/qwen3-1.7b_gpu.yaml as it stands (EMA reference, FSDP2, random positions, 16 variable-length
    thoughts at temperature 0.7, vLLM), shrunk for this CPU: a tiny Qwen3 ``folder``, a local slice of FineWeb-Edu
    for the hub's, 32-token contexts, thoughts of at most 8 tokens, one position per process and micro-batch, and
    lr 1e-3 so that one update moves the weights enough for the sync check below to see it."""
    return [
        "--config", "configs/rlp/qwen3-1.7b_gpu.yaml", f"model.default.path={folder}",
        "data.hub_id=''", "data.hub_config=''", "data.data_files=[webtext/fineweb_edu_sample.txt]",
        "data.context_len=32", "data.eval_docs=8", "data.eval_positions=4", "rollout.max_thought_len=8",
        "trainer.batch_positions=2", "learner.grad_accum_steps=1", "learner.lr=1e-3", "trainer.save_every=1",
        "trainer.report_to=none", "trainer.progress=false", "trainer.num_threads=1",
    ]  # fmt: skip


@pytest.mark.slow
def test_rlp_recipe_trains_sharded_with_its_ema_and_vllm_engines_get_the_gathered_weights(tmp_path):
    """The RLP recipe in two processes under FSDP2, each with its own vLLM engine (the HF sampler where vLLM is not
    installed): started from a folder gathered out of the shards (one decoder layer per file), then synced in memory
    after each update, each tensor gathered once. Step 2 samples with the weights step 1 pushed: the sampler's
    log-probs equal the learner's recompute (a sync that changed nothing would leave step 1's update between them).
    The EMA reference, sharded like the model, moves by 1 − ema_decay towards the live weights each step."""
    from thinkrl.config import DataConfig, load_config

    data_dir = DataConfig().resolved_data_dir()
    if data_dir is None or not (data_dir / "webtext/fineweb_edu_sample.txt").is_file():
        pytest.skip("needs ../shared/data/webtext")
    spec = importlib.util.spec_from_file_location("scratch_folder", ROOT / "scripts/scratch_folder.py")
    scratch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scratch)
    tiny = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
    tiny.update(num_key_value_heads=1, head_dim=32, vocab_size=384)  # head_dim 32: vLLM's CPU kernels need >= 32
    folder = scratch.write_scratch_folder(ROOT / "configs/models/qwen3-1.7b.json", tmp_path / "qwen3", **tiny)
    vllm = importlib.util.find_spec("vllm") is not None
    out = tmp_path / "rlp"
    extra = [] if vllm else ["rollout.backend=hf"]
    ok(train(two_processes(), out, "trainer.max_steps=2", *extra, recipe=_rlp_recipe(folder)))
    cfg = load_config(out / "config.yaml")
    assert (cfg.reward.baseline, cfg.reward.ema_decay, cfg.trainer.sharding) == ("ema", 0.999, "fsdp2")
    assert (cfg.data.positions, cfg.rollout.length_mode, cfg.rollout.num_thoughts) == ("random", "variable", 16)
    thoughts = json.loads((out / "rollouts" / "step-000001.jsonl").read_text().splitlines()[0])["thoughts"]
    assert len(thoughts) == 16 and all(1 <= t["length"] <= 8 for t in thoughts)
    if vllm:
        for rank in (0, 1):
            folder = out / f"rank{rank}" / "vllm-weights"
            assert len(list(folder.glob("model-*.safetensors"))) >= 2
        steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        gaps = {m["step"]: m["train/sampler_gap"] for m in steps if "train/sampler_gap" in m}
        assert set(gaps) == {1, 2} and max(gaps.values()) < 1e-5, gaps
    states = [trained_state(out / f"checkpoint-{step}") for step in (1, 2)]
    names = [k.split(":", 1)[1] for k in states[1] if k.startswith("ema:")]
    assert names and all(f"weight:A.{n}" in states[1] for n in names)
    for name in names:
        want = torch.lerp(states[0][f"ema:{name}"], states[1][f"weight:A.{name}"], 1 - 0.999)
        torch.testing.assert_close(states[1][f"ema:{name}"], want, rtol=0, atol=1e-8)
    assert sum(not torch.equal(states[0][f"ema:{n}"], states[1][f"ema:{n}"]) for n in names) > len(names) // 2


@pytest.mark.gpu
def test_fsdp2_on_a_gpu_equals_unsharded_and_trains_in_bf16(tmp_path):
    """One GPU, one process (its own NCCL group): fsdp2 in fp32 equals the unsharded run; under an accelerate launch
    with bf16 mixed precision (FSDP2's MixedPrecisionPolicy) it trains, checkpoints sharded and resumes.
    (accelerate's FSDP plugin only engages with 2+ GPUs: distributed type FSDP is not reachable on one.)"""
    unsharded, sharded, mixed = tmp_path / "unsharded", tmp_path / "fsdp2", tmp_path / "bf16"
    ok(train(ONE, unsharded, "trainer.max_steps=2", gpu=True))
    ok(train(ONE, sharded, "trainer.max_steps=2", "trainer.sharding=fsdp2", gpu=True))
    assert json.loads((sharded / "rank0" / "shards.json").read_text())["A"]["local"] > 0
    for step in (1, 2):
        for key in ("train/loss", "train/grad_norm", "train/reward"):
            assert step_metrics(sharded, step)[key] == pytest.approx(step_metrics(unsharded, step)[key], rel=1e-3), key
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--mixed_precision", "bf16"]
    ok(train(launch, mixed, "trainer.max_steps=2", "trainer.sharding=fsdp2", gpu=True))
    ok(train(launch, mixed, "trainer.max_steps=3", "trainer.sharding=fsdp2", gpu=True))
    assert (mixed / "checkpoint-3" / "sharded" / ".metadata").is_file()
    losses = [step_metrics(mixed, s)["train/loss"] for s in (1, 2, 3)]
    assert all(math.isfinite(v) for v in losses)
    # bf16 compute: close to the fp32 run, not equal
    assert losses[0] == pytest.approx(step_metrics(unsharded, 1)["train/loss"], rel=0.05)


@pytest.mark.parametrize(
    "kind, plugin, words",
    [
        ("DEEPSPEED", None, "DEEPSPEED launches are not supported; shard with FSDP2"),
        ("MEGATRON_LM", None, "MEGATRON_LM launches are not supported"),
        ("FSDP", 1, "asks for FSDP version 1; set fsdp_version: 2"),
    ],
)
def test_deepspeed_and_fsdp1_launches_are_refused_in_one_line(kind, plugin, words):
    """What accelerate reports for such a launch (its distributed type, the FSDP plugin's version) stands in for the
    launch itself: neither starts on this machine (no deepspeed package; FSDP needs GPUs)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from thinkrl.distributed.sharding import uses_fsdp2

    state = SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=plugin))
    accelerator = SimpleNamespace(distributed_type=DistributedType[kind], state=state)
    for setting in ("none", "fsdp2"):
        with pytest.raises(ConfigError) as info:
            uses_fsdp2(accelerator, setting)
        assert words in str(info.value) and "\n" not in str(info.value)


@pytest.mark.slow
def test_lora_with_vllm_under_fsdp2_is_refused_before_the_engine_starts(tmp_path):
    out = tmp_path / "run"
    done = train(
        ONE, out, "trainer.max_steps=1", "trainer.sharding=fsdp2", "rollout.backend=vllm", "model.default.lora.r=4"
    )
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("thinkrl: error: rollout.backend=vllm cannot merge LoRA adapters of a sharded model")
    assert "rollout.backend=hf" in last and "trainer.sharding=none" in last
    assert "Traceback" not in done.stderr
    assert not find_checkpoints(out)
