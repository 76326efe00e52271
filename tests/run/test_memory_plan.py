"""``thinkrl plan`` (run/memory_plan.py): its formulas on hand-computed cases and against what autograd keeps, its
FLOPs against the trainer's logged ``compute/flops`` (exact for the fixed-length Quiet-STaR preset, a bound for
variable-length thoughts), its one-line errors and its verdict."""

import json
from pathlib import Path

import pytest
import torch

from thinkrl.cli import main
from thinkrl.config import DataConfig, load_config
from thinkrl.run.memory_plan import (
    Arch,
    Forward,
    PlanError,
    arch_from_config,
    forward_bytes,
    layer_bytes,
    plan,
    resolve_archs,
)
from thinkrl.run.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
# conftest.TINY's model: hidden 32, 2 layers, 2 heads, MLP 64 (test_compute.py's N_TINY)
D, F, LAYERS = 32, 64, 2
N_TINY = LAYERS * (4 * D * D + 3 * D * F + 2 * D) + D


def logged_flops(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["compute/flops"] for r in rows if "train/loss" in r]


def test_parameters_and_held_memory_by_hand(tiny_config):
    cfg = tiny_config("model.weight_groups=[A,B,A]", "model.freeze=[reasoner]", "head.form=gate")
    archs = resolve_archs(cfg)
    vocab = archs["A"].vocab  # the synthetic words and the two markers
    assert archs["A"].non_embedding() == N_TINY
    assert archs["A"].total() == N_TINY + 2 * vocab * D
    p = plan(cfg, archs, gpus=1, gpu_memory_gb=1, device="cpu")
    total = 2 * (N_TINY + 2 * vocab * D) + (2 * D + 1)  # two models and the gate
    trainable = N_TINY + 2 * vocab * D + 2 * D + 1  # the frozen reasoner B has no gradients or moments
    assert p.memory["weights"] == 4 * total
    assert p.memory["gradients"] == 4 * trainable and p.memory["optimizer"] == 8 * trainable
    assert p.groups["B"]["trainable"] == 0
    # fsdp2 over 2 processes shards weights, gradients and moments, and gathers whole models during a step
    sharded = plan(load_config(None, ["trainer.sharding=fsdp2"]), archs={"A": archs["A"]}, gpus=2, device="cpu")
    full = plan(load_config(None, []), archs={"A": archs["A"]}, gpus=2, device="cpu")
    assert sharded.memory["weights"] == full.memory["weights"] / 2
    assert sharded.memory["fsdp2 gathered weights"] == full.memory["weights"]
    # LoRA: only the adapters (r·(in + out) per projection) and the two marker rows train
    lora = plan(load_config(None, ["model.default.lora.r=4"]), archs={"A": archs["A"]}, device="cpu")
    assert lora.groups["A"]["trainable"] == LAYERS * 4 * 4 * (D + D) + 2 * D


def test_qwen2_config_numbers():
    arch = arch_from_config(json.loads((ROOT / "configs/models/qwen2.5-0.5b.json").read_text()), "qwen")
    assert arch.vocab == 151936 + 2 and arch.kv == 128 and arch.qkv_bias
    # Qwen2.5-0.5B: 494M parameters with tied embeddings; thinkrl unties the LM head (+136M)
    assert abs(arch.total() - arch.vocab * arch.hidden - 494.0e6) < 1e6


def test_activation_bytes_are_what_autograd_keeps():
    """A causal forward of a small Llama: the bytes of every distinct tensor saved for the backward equal the
    plan's per-token, per-layer count (within 3 %)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d, f, heads, kv_heads, layers, vocab, b, s = 64, 256, 4, 2, 3, 300, 4, 48
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=d,
            intermediate_size=f,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            num_hidden_layers=layers,
            tie_word_embeddings=False,
        )
    )
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=torch.randint(0, vocab, (b, s)), logits_to_keep=1)
    arch = Arch("test", vocab, d, layers, heads, kv_heads, d // heads, f)
    forward = Forward("A", "score_and_loss", b * s, True)
    predicted = layers * layer_bytes(arch, 4, forward) + forward_bytes(arch, 4, forward)
    assert sum(seen.values()) == pytest.approx(predicted, rel=0.03)


def _quiet_star(tmp_path, *extra):
    data_dir = DataConfig().resolved_data_dir()
    if data_dir is None or not (data_dir / "tinyshakespeare/input.txt").is_file():
        pytest.skip("needs ../shared/data/tinyshakespeare")
    tiny = [
        "data.context_len=32",
        "trainer.batch_positions=62",  # 2 windows of 31 positions
        "model.default.scratch.hidden_size=32",
        "model.default.scratch.num_layers=2",
        "model.default.scratch.num_heads=1",
        "model.default.scratch.intermediate_size=64",
        "trainer.max_steps=2",
        "trainer.lm_warmup_steps=0",
        "data.eval_positions=31",
        "data.max_docs=40",
        "trainer.eval_every=0",
        "trainer.save_every=0",
        "trainer.report_to=none",
        "trainer.progress=false",
        "trainer.num_threads=1",
        f"trainer.output_dir={tmp_path}",
    ]
    return load_config(ROOT / "configs/quiet_star/tiny_shakespeare.yaml", [*tiny, *extra])


@pytest.mark.parametrize("fused", ["false", "true"])  # the recipe's two phases, and sampling in the learning passes
def test_quiet_star_flops_equal_the_logged_ones(tmp_path, fused):
    cfg = _quiet_star(tmp_path, f"rollout.fused_passes={fused}")
    assert cfg.fused_sampling() == (fused == "true")
    Trainer(cfg).train()
    expected = plan(cfg, resolve_archs(cfg), device="cpu").flops_step
    assert logged_flops(tmp_path) == [expected, expected]


def test_variable_length_flops_are_a_bound(tmp_path):
    """The default recipe samples thoughts that stop early: every logged step stays at or under the plan."""
    cfg = load_config(
        ROOT / "configs/default.yaml",
        [
            "trainer.max_steps=3",
            "trainer.lm_warmup_steps=0",
            "trainer.batch_positions=8",
            "data.eval_positions=8",
            "trainer.eval_every=0",
            "trainer.save_every=0",
            "trainer.report_to=none",
            "trainer.progress=false",
            "trainer.num_threads=1",
            f"trainer.output_dir={tmp_path}",
        ],
    )
    Trainer(cfg).train()
    bound = plan(cfg, resolve_archs(cfg), device="cpu").flops_step
    logged = logged_flops(tmp_path)
    assert len(logged) == 3 and all(0 < f <= bound for f in logged), (logged, bound)


def test_a_model_without_a_config_is_one_line():
    cfg = load_config(None, ["model.default.path=no-such-org/no-such-model"])
    with pytest.raises(PlanError, match="--model-config") as info:
        resolve_archs(cfg)
    assert "\n" not in str(info.value)
    with pytest.raises(PlanError, match="not a local folder"):
        resolve_archs(load_config(None, ["model.default.path=./no-such-folder"]))


def test_cli_says_whether_it_fits(capsys):
    recipe = str(ROOT / "configs/default.yaml")
    assert main(["plan", "--config", recipe, "--device", "cpu", "--gpu-memory", "1"]) == 0
    assert "FITS" in capsys.readouterr().out
    assert main(["plan", "--config", recipe, "--gpu-memory", "0.02", "--reserve", "0"]) == 0
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "try model.default.gradient_checkpointing=true" in out
    assert main(["plan", "--config", recipe, "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fits"] and result["flops_step"] > 0
    # a hub model that is not cached: the error line names the way out
    assert main(["plan", "--config", recipe, "model.default.path=no-such-org/no-such-model"]) == 2
    assert "--model-config" in capsys.readouterr().err
    assert main(["plan", "--config", recipe, "--model-config", str(ROOT / "configs/models/mistral-7b.json")]) == 0
    assert "4096" in capsys.readouterr().out
