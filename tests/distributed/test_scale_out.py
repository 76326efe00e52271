"""Loading and launching for large models, on CPU: models built on the meta device and filled shard by shard from
their safetensors files (models/meta_loading.py), and several machines as localhost launches of `accelerate launch
--num_machines 2 --machine_rank 0|1` (gloo), with hybrid sharding (trainer.sharding=hsdp) across them."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from checkpoints import assert_same_state
from launching import COMMON, ok, run_script, step_metrics, train_on_machines, two_processes
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from thinkrl.config import load_config
from thinkrl.models.roles import build_roles

ROOT = Path(__file__).resolve().parents[2]
CHECK = Path(__file__).with_name("loading_check.py")


@pytest.fixture(scope="module")
def default_folders(tmp_path_factory) -> list[str]:
    """The default recipe's two scratch models (launching.COMMON) saved as HF folders, built as the trainer builds
    them: a run that loads these folders starts from the same weights as one that builds the models."""
    root = tmp_path_factory.mktemp("folders")
    cfg = load_config(COMMON[1], COMMON[2:])
    set_seed(cfg.trainer.seed)
    for group, model in build_roles(cfg).models.items():
        model.save_pretrained(root / group)
    return [
        "model.tokenizer=synthetic",
        f"model.default.path={root / 'A'}",
        f"model.groups={{B: {{path: {root / 'B'}}}}}",
    ]


@pytest.fixture(scope="module")
def tied_folder(tmp_path_factory) -> Path:
    """A small pretrained-style folder: tied embeddings (no lm_head tensor in the file) and 5 rows fewer than its
    tokenizer (SmolLM2's), so loading adds 5 drawn rows and the 2 thought markers."""
    from thinkrl.models.smollm2 import smollm2_folder

    out = tmp_path_factory.mktemp("tied") / "model"
    tok = AutoTokenizer.from_pretrained(smollm2_folder())
    config = LlamaConfig(
        vocab_size=len(tok) - 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=256, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["float32", "bfloat16+lora"])
def test_meta_loading_equals_whole_loading(tied_folder, variant, tmp_path):
    """In 2 processes, every gathered weight and buffer of a meta-device load equals today's whole load then shard,
    bit for bit: the untied head from the embedding, the thought markers (mean of the init text's rows), peft's
    marker rows and LoRA B. What a whole load draws from the global RNG is drawn from seeded generators instead:
    the 5 rows the checkpoint lacks (same N(0, initializer_range)) and LoRA A (same kaiming bound)."""
    out = tmp_path / "report.json"
    extra = ["model.dtype=bfloat16", "model.default.lora.r=4"] if variant != "float32" else []
    recipe = [f"model.default.path={tied_folder}", "model.thought_init_token=the", *extra]
    ok(run_script(two_processes(), CHECK, str(out), str(ROOT / "configs/default.yaml"), *recipe))
    report = json.loads(out.read_text())
    assert not report["on_meta"]
    assert all(diff == 0 for diff in report["buffers"].values()), report["buffers"]
    tensors = report["tensors"]
    vocab = len(AutoTokenizer.from_pretrained(tied_folder)) + 2
    saved, markers = vocab - 7, [vocab - 2, vocab - 1]
    embeddings = [n for n, t in tensors.items() if "row_diff" in t]
    assert len(embeddings) == 4  # the input embedding and the untied LM head of both weight groups (A, B)
    for name, t in tensors.items():
        if "lora_A" in name:
            assert t["max_diff"] > 0 and t["std"][1] == pytest.approx(t["std"][0], rel=0.15), name
        elif name in embeddings:
            rows = t["row_diff"]
            assert max(rows[:saved]) == 0 and all(rows[i] == 0 for i in markers), name
            assert all(r > 0 for r in rows[saved : vocab - 2]), name  # drawn, not copied
            assert all(0.012 < s < 0.028 for s in t["row_std"][saved : vocab - 2]), name  # N(0, 0.02)
        else:
            assert t["max_diff"] == 0, (name, t["max_diff"])
    want = "torch.bfloat16" if "bfloat16" in variant else "torch.float32"
    # stored in model.dtype directly; peft keeps its adapters in float32 (in both loads)
    assert {d for n, d in report["dtypes"].items() if "lora_" not in n and "trainable_tokens" not in n} == {want}
    if "lora" in variant:
        assert any("lora_B" in n for n in tensors) and any("trainable_tokens_delta" in n for n in tensors)


@pytest.mark.slow
def test_hsdp_on_two_machines_equals_one_process_and_resumes_on_other_machines(single_run, default_folders, tmp_path):
    """2 machines × 2 processes on localhost, FSDP2 on a 2-D mesh (shard within a machine, replicate across),
    models loaded through the meta device from folders holding the default recipe's initial weights: every logged
    metric equals the 1-process whole-model run. Its checkpoint-1 then resumes as 2 machines × 1 process of plain
    data parallelism and ends step 2 where the 1-process run does (weights, AdamW moments, lr)."""
    hsdp = tmp_path / "hsdp"
    ok(train_on_machines(2, 2, hsdp, "trainer.max_steps=2", "trainer.sharding=hsdp", *default_folders))
    rows = [
        [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (single_run, hsdp)
    ]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]]
    compared = 0
    for a, b in zip(*rows):  # the initial evaluation, both steps, the final evaluation
        for key, value in a.items():
            if isinstance(value, float) and not key.startswith(("timing/", "compute/")):
                assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-7), (a["step"], key)
                compared += 1
    assert compared > 40
    shards = [json.loads((hsdp / f"rank{r}" / "shards.json").read_text()) for r in range(4)]
    for name in ("A", "B"):  # each machine's two processes hold half each; the other machine holds the same halves
        assert shards[0][name]["local"] + shards[1][name]["local"] == shards[0][name]["full"]
        assert [s[name]["local"] for s in shards[2:]] == [s[name]["local"] for s in shards[:2]]
    resumed = tmp_path / "resumed"
    shutil.copytree(hsdp, resumed, ignore=shutil.ignore_patterns("checkpoint-2"))
    ok(train_on_machines(2, 1, resumed, "trainer.max_steps=2", *default_folders))  # hsdp → unsharded, 4 → 2
    for key in ("train/loss", "train/grad_norm", "train/lr"):
        assert step_metrics(resumed, 2)[key] == pytest.approx(step_metrics(single_run, 2)[key], rel=1e-4), key
    # 4 processes sum gradients in another order than 1: the moments agree within 3e-8, and Adam's sign-like step
    # turns that into a fraction of lr for ~50 of 270k weights whose gradient is ~0 (the hsdp run's own too)
    assert_same_state(resumed / "checkpoint-2", single_run / "checkpoint-2", outliers=5e-4)


def test_hsdp_needs_the_same_process_count_on_every_machine(monkeypatch):
    from thinkrl.distributed.sharding import hsdp_mesh
    from thinkrl.errors import ConfigError

    monkeypatch.setattr("torch.distributed.get_world_size", lambda: 3)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="same process count on every machine"):
        hsdp_mesh("hsdp", "cpu")
    assert hsdp_mesh("fsdp2", "cpu") is None
